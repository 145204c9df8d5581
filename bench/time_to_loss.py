"""Wall time to a fixed validation loss: the GPT-2 recipe against lmforge's fastest. JSON lines.

    python bench/time_to_loss.py --preset gpt2-124m --target-loss 3.8                      # CUDA
    python bench/time_to_loss.py --preset tiny --target-loss 5.0 --vocab-size 2048 \\
        --batch-size 16 --max-steps 300 --lr 1e-2 --device cpu --threads 2                  # CPU

Data: the books of ../shared/data/lm/gutenberg (10 in this copy, two of them Latin-1, decoded as such) then
../shared/data/lm/tinystories, tokenized once with an lmforge BPE tokenizer into --cache; validation is the last --val-fraction of the
characters (the tail of TinyStories' valid file). Recipes, on the shape of --preset:

- gpt2: learned positions, GELU (tanh), LayerNorm, biases, tied head, GPT-2 init; AdamW, warmup + cosine.
- fastest: the speedrun architecture (`lmforge.config.presets.SPEEDRUN`: rotary, QK-norm, ReLU^2,
  RMSNorm, no biases, untied zero-init head, zero-init projections); Muon on the blocks' matrices,
  AdamW on the rest, the same schedule; chunked cross-entropy on CUDA.

Both train with the same batches and schedule length, and with --lr as AdamW's peak learning rate
unless --fastest-lr gives the fastest recipe its own (Muon's groups follow the same schedule); the clock runs during training steps only (validation every --eval-interval steps is not
counted; a first step's compilation is). A run stops at the first validation at or below the target.
One line per recipe, then a line with the ratio of the times: to the target, or, when a recipe
stopped short of it, to the lowest validation loss both reached ("requested_target_reached": false).
SIGTERM (what `timeout` sends) stops the run in progress: its line comes out with what it measured
up to there (its curve, the last validation's loss), marked "stopped_early", the recipes after it
do not run, and the ratio line follows if both recipes have a validation to compare.

The corpus is small: about 3M tokens at a 2048-token vocabulary, fewer at larger ones. At GPT-2's
32 x 1024 tokens a step, one epoch is about 90 steps; pick a target that both recipes reach before
they start to overfit (the `curve` of a run with --target-loss 0 shows where that is).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

from lmforge.config import TrainConfig, preset
from lmforge.config.presets import SPEEDRUN
from lmforge.data import prepare, train_tokenizer
from lmforge.model import Transformer
from lmforge.tokenizer import Tokenizer
from lmforge.train.objectives import Objective, weighted_mean_loss
from lmforge.train.optim import build_optimizer, lr_at
from lmforge.utils.device import autocast, autocast_dtype, compile_module, resolve_device
from _data import data_files, print_row, shared_data  # bench/_data.py
from _stop import Stopped, entry_point, stop_on_sigterm  # bench/_stop.py

DATA = shared_data() / "lm"


def corpus_files() -> list[Path]:
    return data_files(DATA / "gutenberg") + [  # the books, not the folder's SOURCE.txt
        DATA / "tinystories" / "tinystories_train_head.txt", DATA / "tinystories" / "tinystories_valid_head.txt",
    ]


def utf8_copies(cache: Path) -> list[Path]:
    """The corpus as UTF-8: two of the Gutenberg books are Latin-1 (NLTK's copies); decode those as such."""
    out = []
    for src in corpus_files():
        dst = cache / "text" / src.name
        if not dst.is_file():
            raw = src.read_bytes()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = raw.decode("latin-1")
            dst.parent.mkdir(parents=True, exist_ok=True)
            tmp = dst.with_suffix(".tmp")
            tmp.write_text(text, encoding="utf-8")
            tmp.rename(dst)
        out.append(dst)
    return out


def prepared(cache: Path, vocab_size: int, val_fraction: float) -> Path:
    """Tokenizer and shards, built once per (vocab size, val fraction) under `cache`."""
    data = cache / f"lm-v{vocab_size}-val{val_fraction}"
    if not (data / "meta.json").is_file():
        files = utf8_copies(cache)
        tok = cache / f"tokenizer-v{vocab_size}"
        if not (tok / "tokenizer.json").is_file():
            train_tokenizer(files, vocab_size, tok, progress=False)
        prepare(files, tok, data, val_fraction=val_fraction, progress=False)
    return data


def recipes(shape: str, args, device: torch.device) -> dict:
    base = dict(max_steps=args.max_steps, batch_size=args.batch_size, warmup_steps=args.warmup_steps, seed=args.seed)
    fast_lr = args.fastest_lr or args.lr
    return {
        "gpt2": (preset(shape, position="learned", norm="layernorm", mlp="gelu_tanh", bias=True, tie_embeddings=True),
                 TrainConfig(optim="adamw", lr=args.lr, min_lr=args.lr / 10, **base)),
        "fastest": (preset(shape, **SPEEDRUN),
                    TrainConfig(optim="muon", lr=fast_lr, min_lr=fast_lr / 10, muon_lr=args.muon_lr,
                                chunked_loss=8192 if device.type == "cuda" else 0, **base)),
    }


def run(name: str, model_cfg, train: TrainConfig, data: Path, args, device: torch.device) -> dict:
    tokenizer = Tokenizer.load(data)
    model_cfg = model_cfg.replace(vocab_size=tokenizer.vocab_size)
    seq_len = args.seq_len or model_cfg.context_length
    task = Objective("causal", model_cfg, tokenizer, train.seed, chunked_loss=train.chunked_loss,
                     label_smoothing=train.label_smoothing)
    windows, val = task.open(str(data), "train", seq_len), task.open(str(data), "val", seq_len)
    val_batches = task.val_batches(val, args.eval_batch_size or train.batch_size, args.eval_batches)
    amp = autocast_dtype(device, "auto")
    torch.manual_seed(train.seed)
    net = Transformer(model_cfg).to(device)
    loss_fn = compile_module(task.loss) if args.compile else task.loss  # model and loss in one graph, as the trainer
    opt = build_optimizer(net, train, device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    clock, first_step, step, val_loss, curve, stopped = 0.0, None, 0, float("nan"), [], False
    try:  # SIGTERM (stop_on_sigterm in main): the steps and validations done so far are reported
        while step < train.max_steps:
            t0 = time.perf_counter()
            for group in opt.param_groups:
                group["lr"] = lr_at(step, train)
            batch = {k: v.to(device, non_blocking=True) for k, v in task.batch(windows, train.batch_size, step).items()}
            with autocast(device, amp):
                loss = loss_fn(net, batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), train.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync()
            clock += time.perf_counter() - t0
            first_step = clock if first_step is None else first_step
            step += 1
            if step % args.eval_interval == 0 or step == train.max_steps:
                val_loss = weighted_mean_loss(loss_fn, task.weight, net, val_batches, device, amp)
                curve.append([step, round(clock, 2), round(val_loss, 4)])
                if val_loss <= args.target_loss:
                    break
    except Stopped:
        stopped = True
        val_loss = curve[-1][2] if curve else float("nan")  # the last validation finished
    out = {
        "what": "time_to_loss", "recipe": name, "preset": args.preset, "device": str(device),
        "dtype": str(amp or torch.float32).replace("torch.", ""), "compile": args.compile,
        "threads": torch.get_num_threads(), "target_loss": args.target_loss, "reached": val_loss <= args.target_loss,
        "seconds": round(clock, 2), "first_step_seconds": round(first_step, 2) if first_step is not None else None, "step": step,
        "tokens": step * train.batch_size * seq_len, "val_loss": round(val_loss, 4) if curve else None, "params": net.num_params(),
        "optim": train.optim, "lr": train.lr, "muon_lr": train.muon_lr if train.optim == "muon" else None,
        "batch_size": train.batch_size, "seq_len": seq_len, "vocab_size": model_cfg.vocab_size,
        "curve": curve,  # [step, training seconds, val loss] at every validation
    }
    if stopped:
        out["stopped_early"] = True
    return out


@entry_point
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="gpt2-124m", help="the shape both recipes take (layers, width, heads, context)")
    p.add_argument("--target-loss", type=float, required=True, help="validation loss (nats/token) to reach")
    p.add_argument("--vocab-size", type=int, default=16384, help="of the BPE tokenizer trained on the corpus")
    p.add_argument("--val-fraction", type=float, default=0.05)
    p.add_argument("--max-steps", type=int, default=3000, help="schedule length of both recipes; a run stops there")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--lr", type=float, default=6e-4, help="AdamW's peak lr (the gpt2 recipe; the fastest's too unless --fastest-lr)")
    p.add_argument("--fastest-lr", type=float, default=None, help="AdamW's peak lr in the fastest recipe (default: --lr)")
    p.add_argument("--muon-lr", type=float, default=0.02)
    p.add_argument("--warmup-steps", type=int, default=None, help="default: 5%% of --max-steps")
    p.add_argument("--eval-interval", type=int, default=50)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--eval-batch-size", type=int, default=None)
    p.add_argument("--recipes", default="gpt2,fastest")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", default="auto")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="default: on CUDA")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--cache", type=Path, default=Path("/tmp/lmforge-bench-time-to-loss"))
    p.add_argument("--data", type=Path, default=None, help="already prepared shards to use instead of the shared corpus")
    args = p.parse_args()
    if args.eval_interval < 1:
        p.error(f"--eval-interval must be >= 1, got {args.eval_interval}")

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    args.compile = device.type == "cuda" if args.compile is None else args.compile
    args.warmup_steps = max(1, args.max_steps // 20) if args.warmup_steps is None else args.warmup_steps
    chosen = args.recipes.split(",")
    # Checked before the tokenizer and shards are built (minutes): the recipes, the preset, the settings.
    runs = {name: recipe for name, recipe in recipes(args.preset, args, device).items() if name in chosen}
    if unknown := [n for n in chosen if n not in runs]:
        p.error(f"unknown --recipes {unknown}; choose from gpt2, fastest")
    results, current, stopped = {}, None, False
    with stop_on_sigterm():  # SIGTERM (`timeout`): the run in progress reports what it has, the rest do not start
        try:
            data = args.data or prepared(args.cache, args.vocab_size, args.val_fraction)
            for name, (model_cfg, train) in runs.items():
                current = name
                results[name] = run(name, model_cfg, train, data, args, device)
                print_row(results[name])
                if results[name].get("stopped_early"):
                    stopped = True
                    break
        except Stopped:  # outside a training loop: preparing the data, building a model
            stopped = True
            print_row({"what": "time_to_loss", "recipe": current, "preset": args.preset, "device": str(device),
                       "stopped_early": True, "failed": "stopped before its first training step"})
    if len(results) == 2 and all(lowest(r) is not None for r in results.values()):
        line = {"what": "time_to_loss_ratio", "preset": args.preset, "device": str(device), **ratio(results, args.target_loss)}
        print_row({**line, "stopped_early": True} if stopped else line)


def ratio(results: dict, target: float) -> dict:
    """fastest / gpt2 wall time to `target`; if a recipe stopped short of it, to the lowest
    validation loss that both reached (read off their curves), so that one run still compares them."""
    if not all(r["reached"] for r in results.values()):
        target = max(lowest(r) for r in results.values())
    seconds = {name: next(t for _, t, loss in r["curve"] if loss <= target) for name, r in results.items()}
    return {"target_loss": target, "requested_target_reached": target == results["gpt2"]["target_loss"],
            "fastest_over_gpt2": round(seconds["fastest"] / seconds["gpt2"], 3), "seconds": seconds}


def lowest(result: dict) -> float | None:
    """The lowest validation loss on a run's curve; None before its first one, or if all were nan (diverged)."""
    return min((loss for _, _, loss in result["curve"] if math.isfinite(loss)), default=None)


if __name__ == "__main__":
    main()
