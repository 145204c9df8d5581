"""A real scaling study: sweep a grid on ../shared/data/lm, fit on all but the largest model, predict it.

    python bench/scaling_study.py [--grid bench/grids/cpu-study.yaml] [--out runs/scaling-study]

Prints JSON lines: one per run of the largest model with observed and predicted final loss and the
relative error, then a summary. Uses TinyStories and the UTF-8 Gutenberg books (two of the ten are
Latin-1, which `lmforge prepare` rejects with a pointer to iconv).
"""

from __future__ import annotations

import os

# scipy's OpenBLAS threads make thousands of tiny L-BFGS-B solves 10-30x slower when a core is busy.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from lmforge.data import prepare, train_tokenizer  # noqa: E402
from lmforge.scaling import ParametricLaw, approach3, fit, read_runs, sweep  # noqa: E402
from _data import shared_data  # noqa: E402  (bench/_data.py)

DATA = shared_data() / "lm"
BOOKS = ["austen-emma", "austen-persuasion", "blake-poems", "chesterton-brown", "milton-paradise",
         "shakespeare-hamlet", "whitman-leaves"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--grid", default=str(Path(__file__).parent / "grids" / "cpu-study.yaml"))
    p.add_argument("--out", default="runs/scaling-study")
    args = p.parse_args()
    out = Path(args.out)
    files = sorted((DATA / "tinystories").glob("*.txt")) + [DATA / "gutenberg" / f"{b}.txt" for b in BOOKS]
    if not (out / "data" / "meta.json").exists():
        train_tokenizer(files, 2048, out / "tokenizer")
        prepare(files, out / "tokenizer", out / "data", val_fraction=0.05)
    t0 = time.perf_counter()
    rows = sweep(args.grid, out / "data", out / "study", progress=False)
    sweep_seconds = time.perf_counter() - t0
    fit(out / "study", n_bootstrap=100, progress=False)  # every approach on every run: fit.json + plots

    runs = read_runs(out / "study")
    largest = max(r.params for r in runs)
    law = ParametricLaw(**approach3([r for r in runs if r.params < largest])["law"])
    errors = []
    for r in sorted((r for r in runs if r.params == largest), key=lambda r: r.tokens):
        predicted = float(law.loss(r.params, r.tokens))
        errors.append(abs(predicted - r.loss) / r.loss)
        print(json.dumps({"what": "scaling_holdout", "params": r.params, "tokens": r.tokens, "observed": round(r.loss, 4),
                          "predicted": round(predicted, 4), "rel_error": round(errors[-1], 4)}))
    print(json.dumps({"what": "scaling_study", "runs": len(rows), "sweep_seconds": round(sweep_seconds, 1),
                      "fit_on": sum(r.params < largest for r in runs), "law": law.to_dict(),
                      "max_rel_error": round(max(errors), 4), "mean_rel_error": round(sum(errors) / len(errors), 4)}))


if __name__ == "__main__":
    main()
