"""How a benchmark ends: SIGTERM as an exception, so that a benchmark cut short by `timeout` (a call
with a time limit) still reports what it measured; and bad input as one line, not a traceback."""

import contextlib
import functools
import signal
import sys
from pathlib import Path
from typing import Callable, Iterator


class Stopped(BaseException):
    """SIGTERM arrived. A BaseException, so that a comparison's `except Exception` lets it through."""


def _raise(signum, frame) -> None:
    raise Stopped


@contextlib.contextmanager
def stop_on_sigterm() -> Iterator[None]:
    previous = signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def entry_point(main: Callable[[], None]) -> Callable[[], None]:
    """A bench's `main`: lmforge's UserError (bad input: an unknown preset, a missing file) becomes one
    line `SCRIPT: error: MESSAGE` on stderr and exit status 2, as argparse's errors and the lmforge
    command's are, not a traceback. Stopped and the rest are left to the script."""
    @functools.wraps(main)
    def run() -> None:
        try:
            main()
        except Exception as e:
            # A UserError's module is loaded once one is raised: this file imports nothing of lmforge
            # (distributed_train.py puts src on the path itself).
            errors = sys.modules.get("lmforge.utils.errors")
            if errors is None or not isinstance(e, errors.UserError):
                raise
            print(f"{Path(sys.argv[0]).name}: error: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
            raise SystemExit(e.exit_code) from None
    return run
