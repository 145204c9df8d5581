"""A real scaling study: sweep a grid on ../shared/data/lm, fit on all but the largest model, predict it.

    python bench/scaling_study.py [--grid bench/grids/cpu-study.yaml] [--out runs/scaling-study]

Prints JSON lines: one per run of the largest model with observed and predicted final loss and the
relative error, then a summary (`sweep_seconds`: this invocation; `run_seconds`: the runs' own wall
time over every attempt, so a resumed study still adds up). Uses TinyStories and the UTF-8 Gutenberg books (two of the ten are
Latin-1, which `lmforge prepare` rejects with a pointer to iconv).

SIGTERM (what `timeout` sends) stops the study: a run in training stops after its current step
and keeps a checkpoint, and the line {"what": "stopped", "stopped_early": true, "during",
"runs_done", ...} says how far it got; running the same command again resumes the sweep.
"""

from __future__ import annotations

import os

# scipy's OpenBLAS threads make thousands of tiny L-BFGS-B solves 10-30x slower when a core is busy.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from lmforge.data import prepare, train_tokenizer  # noqa: E402
from lmforge.scaling import fit, held_out, load_grid, read_runs, sweep  # noqa: E402
from lmforge.scaling.runs import RESULTS  # noqa: E402
from lmforge.utils.errors import UserError  # noqa: E402
from _data import data_files, log, print_row, shared_data  # noqa: E402  (bench/_data.py)
from _stop import Stopped, entry_point, stop_on_sigterm  # noqa: E402  (bench/_stop.py)

DATA = shared_data() / "lm"
BOOKS = ["austen-emma", "austen-persuasion", "blake-poems", "chesterton-brown", "milton-paradise",
         "shakespeare-hamlet", "whitman-leaves"]


@entry_point
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--grid", default=str(Path(__file__).parent / "grids" / "cpu-study.yaml"))
    p.add_argument("--out", default="runs/scaling-study")
    args = p.parse_args()
    load_grid(args.grid)  # a bad grid is refused now, not after the tokenizer and the shards are built
    out = Path(args.out)
    t0, stage = time.perf_counter(), ["prepare"]
    try:  # SIGTERM (`timeout`): outside training it raises Stopped; in training the run stops after a step
        with stop_on_sigterm():
            study(args, out, stage)
    except (Stopped, UserError) as e:
        # A run stopped in training: the sweep turns the loop's Interrupted into a UserError saying so.
        if isinstance(e, UserError) and "interrupted at step" not in str(e):
            raise  # entry_point: one line on stderr, exit 2
        results = out / "study" / RESULTS
        done = sum(1 for line in results.read_text().splitlines() if line.strip()) if results.exists() else 0
        print_row({"what": "stopped", "bench": "scaling_study", "stopped_early": True, "during": stage[0],
                   "runs_done": done, "seconds": round(time.perf_counter() - t0, 1),
                   **({"interrupted": str(e)} if isinstance(e, UserError) else {})})


def study(args, out: Path, stage: list[str]) -> None:
    """The study; stage[0] says what it is doing (for the stopped line)."""
    files = data_files(DATA / "tinystories") + [DATA / "gutenberg" / f"{b}.txt" for b in BOOKS]
    if not (out / "data" / "meta.json").exists():
        train_tokenizer(files, 2048, out / "tokenizer")
        prepare(files, out / "tokenizer", out / "data", val_fraction=0.05)
    stage[0] = "sweep"
    t0 = time.perf_counter()
    rows = sweep(args.grid, out / "data", out / "study", progress=False, log=log)  # stdout: JSON lines only
    sweep_seconds = time.perf_counter() - t0
    stage[0] = "fit"
    fit(out / "study", n_bootstrap=100, progress=False)  # every approach on every run: fit.json + plots

    check = held_out(read_runs(out / "study"))  # approach 3 on all but the largest model, predicting it
    for pred in check["predictions"]:
        print_row({"what": "scaling_holdout", "params": check["params"], "tokens": pred["tokens"],
                   "observed": round(pred["observed"], 4), "predicted": round(pred["predicted"], 4),
                   "rel_error": round(pred["rel_error"], 4)})
    print_row({"what": "scaling_study", "runs": len(rows), "sweep_seconds": round(sweep_seconds, 1),
               "run_seconds": round(sum(r["seconds"] for r in rows), 1), "fit_on": check["fit_on"],
               "law": check["law"], "max_rel_error": round(check["max_rel_error"], 4),
               "mean_rel_error": round(check["mean_rel_error"], 4)})


if __name__ == "__main__":
    main()
