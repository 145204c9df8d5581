#!/usr/bin/env bash
# Shards of ../shared/data/lm for the GPU calls, built here on the CPU so that no device time goes
# to training a tokenizer: .bench-data/lm-v16384-val0.05 (16,384-token BPE, bench/time_to_loss.py's
# default), which the training rows' real-data loss checks also read. Carry `.bench-data` (17 MB).
set -euo pipefail
mkdir -p "$(git rev-parse --git-dir)/info"
grep -qx "/.bench-data/" "$(git rev-parse --git-dir)/info/exclude" 2>/dev/null || echo "/.bench-data/" >> "$(git rev-parse --git-dir)/info/exclude"
cd bench
PYTHONPATH=../src ${PYTHON:-../.venv/bin/python} - <<'PY'
from pathlib import Path

from time_to_loss import prepared

print(prepared(Path("../.bench-data").resolve(), 16384, 0.05))
PY
du -sh ../.bench-data/lm-v*
