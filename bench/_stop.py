"""SIGTERM as an exception, so that a benchmark cut short by `timeout` (a call with a time limit)
still reports what it measured."""

import contextlib
import signal
from typing import Iterator


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
