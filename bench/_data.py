"""Where the benchmarks find ../shared/data: $LMFORGE_SHARED_DATA, else shared/data inside the
checkout (how it travels to the device machine, see bench/gpu/README.md), else ../shared/data."""

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def shared_data() -> Path:
    candidates = [Path(os.environ["LMFORGE_SHARED_DATA"])] if os.environ.get("LMFORGE_SHARED_DATA") else []
    candidates += [ROOT / "shared" / "data", ROOT.parent / "shared" / "data"]
    return next((p for p in candidates if p.is_dir()), candidates[-1])
