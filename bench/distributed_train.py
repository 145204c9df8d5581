"""Data-parallel pretraining through torchrun: one JSON line per (processes, parallel) run.

    python bench/distributed_train.py [--nprocs 1 2] [--parallel ddp fsdp] [--preset demo] [--device cpu]
                                      [--steps 40] [--batch-size 8] [--global-micro-batches 2]

Each run is `torchrun --standalone --nproc-per-node N -m lmforge pretrain` on tinyshakespeare (bundled)
with the same global batch (batch_size x global_micro_batches sequences per step, grad_accum =
global / N), so the loss curves agree and only speed differs. Prints {"what", "nproc", "parallel",
"preset", "device", "sequences_per_step", "tokens_per_s" (median of the logged windows after the
first), "data_wait" (share of step time spent waiting for batches), "final_loss", "seconds"}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _data import print_row  # bench/_data.py
from _stop import entry_point  # bench/_stop.py

ROOT = Path(__file__).resolve().parents[1]


@entry_point
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nprocs", type=int, nargs="+", default=[1, 2])
    p.add_argument("--parallel", nargs="+", default=["ddp", "fsdp"])
    p.add_argument("--preset", default="demo")
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--global-micro-batches", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    args = p.parse_args()
    if args.steps < 10:  # windows of 5 steps, the first (compile, warm-up) left out of the median
        p.error(f"--steps must be at least 10 (two logged windows of 5 steps), got {args.steps}")
    uneven = [n for n in args.nprocs if n < 1 or args.global_micro_batches % n]
    if uneven:  # each process takes global / N micro-batches of every step
        p.error(f"--nprocs {' '.join(map(str, uneven))} does not divide --global-micro-batches {args.global_micro_batches}; "
                "pass process counts that divide it, or more micro-batches")

    # src first, then whatever PYTHONPATH already holds (the device image's wheels in /tmp/site, say)
    pythonpath = os.pathsep.join([str(ROOT / "src"), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))])
    env = {**os.environ, "PYTHONPATH": pythonpath, "OMP_NUM_THREADS": str(args.threads)}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sys.path.insert(0, str(ROOT / "src"))
        from lmforge.data import prepare, train_tokenizer

        corpus = ROOT / "src" / "lmforge" / "assets" / "tinyshakespeare.txt"
        train_tokenizer([corpus], 2048, tmp / "tok")
        prepare([corpus], tmp / "tok", tmp / "data", val_fraction=0.1, progress=False)
        for nproc in args.nprocs:
            for parallel in args.parallel if nproc > 1 else ["none"]:
                out = tmp / f"run-{nproc}-{parallel}"
                cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
                       "-m", "lmforge", "pretrain", "--data", str(tmp / "data"), "--out", str(out),
                       "--model.preset", args.preset, "--train.max_steps", str(args.steps),
                       "--train.batch_size", str(args.batch_size),
                       "--train.grad_accum", str(args.global_micro_batches // nproc), "--train.log_interval", "5",
                       "--train.eval_interval", "0", "--train.ckpt_interval", "0", "--train.device", args.device,
                       "--train.tensorboard", "false", "--train.threads", str(args.threads)]
                if nproc > 1:
                    cmd += ["--train.parallel", parallel]
                t = time.perf_counter()
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
                if proc.returncode:  # say why in lmforge's own words (a bad --batch-size, say), not torchrun's traceback
                    own = next((line for line in proc.stderr.splitlines() if line.startswith("lmforge: error:")), None)
                    sys.exit(f"distributed_train: the run on {nproc} process(es) failed: "
                             + (own or f"exit {proc.returncode}\n{proc.stderr.rstrip()}"))
                seconds = time.perf_counter() - t
                rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
                train = [r for r in rows if r["kind"] == "train"]
                print_row({
                    "what": "distributed_train", "nproc": nproc, "parallel": parallel, "preset": args.preset,
                    "device": args.device, "sequences_per_step": args.batch_size * args.global_micro_batches,
                    "tokens_per_s": round(statistics.median(r["tokens_per_s"] for r in train[1:]), 1),
                    "data_wait": round(statistics.median(r["data_wait"] for r in train[1:]), 4),
                    "final_loss": round(train[-1]["loss"], 5), "seconds": round(seconds, 1),
                })


if __name__ == "__main__":
    main()
