"""What the benchmarks share: where they find ../shared/data ($LMFORGE_SHARED_DATA, else shared/data
inside the checkout, how it travels to the device machine, see bench/gpu/README.md, else
../shared/data), which of its files are the data, and how a result line is printed (stdout holds
JSON lines only, one per result; bench/gpu/run.sh collects it as NAME.jsonl)."""

import json
import math
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Beside the data, every folder of ../shared/data holds its provenance (SOURCE.txt) and some a
# readme or licence, under the data's own extension (gutenberg/SOURCE.txt, uci-sentiment/readme.txt).
NOT_DATA = {"source", "readme", "license", "licence"}


def shared_data() -> Path:
    candidates = [Path(os.environ["LMFORGE_SHARED_DATA"])] if os.environ.get("LMFORGE_SHARED_DATA") else []
    candidates += [ROOT / "shared" / "data", ROOT.parent / "shared" / "data"]
    return next((p for p in candidates if p.is_dir()), candidates[-1])


def data_files(folder: Path, pattern: str = "*.txt") -> list[Path]:
    """The files of `folder` matching `pattern`, sorted, without its provenance, readme and licence files."""
    return sorted(p for p in folder.glob(pattern) if p.stem.lower() not in NOT_DATA)


def print_row(row: dict) -> None:
    """`row` as one line of JSON on stdout. A non-finite float (a diverged loss) is written null:
    json.dumps would write NaN or Infinity, which is not JSON and which JSON readers refuse."""
    print(json.dumps(_finite(row)), flush=True)


def log(message: str) -> None:
    """A progress line (lmforge's `log=` callbacks) to stderr, so that stdout stays JSON lines."""
    print(message, file=sys.stderr, flush=True)


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
