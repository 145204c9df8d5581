"""`lmforge demo`: the whole path on the bundled tinyshakespeare, on a laptop CPU.

tokenizer -> shards (last 10% held out, as nanoGPT's shakespeare_char) -> pretrain -> full
validation pass -> loss-curve PNG -> a 200-token sample.
"""

from __future__ import annotations

import shutil
import time
from importlib import resources
from pathlib import Path
from typing import Any, Callable

import torch

from lmforge.checkpoint import find_checkpoints
from lmforge.config import TrainConfig, preset
from lmforge.data import prepare, train_tokenizer
from lmforge.data.corpus import check_tokenizer_out
from lmforge.data.prepare import check_data_out
from lmforge.evaluate import evaluate_lm
from lmforge.infer import load
from lmforge.train import pretrain
from lmforge.train.loop import Interrupted
from lmforge.utils.device import resolve_device
from lmforge.utils.errors import UserError

VOCAB_SIZE = 2048
MODEL = preset("demo")
# Small batches: at a fixed number of tokens (a CPU's budget is about a million in two minutes), 800
# steps of 8 sequences reach 2.40 bits/byte where 250 steps of 32 reach 2.50 in the same time.
TRAIN = TrainConfig(
    max_steps=800,
    batch_size=8,
    lr=3e-3,
    min_lr=3e-4,
    warmup_steps=50,
    weight_decay=0.1,
    eval_interval=200,
    eval_batches=16,
    log_interval=10,
    ckpt_interval=0,
    keep_checkpoints=1,
    seed=1337,
    compile=False,
)
PROMPT = "ROMEO:"
SAMPLE_TOKENS = 200


def corpus_path() -> Path:
    return Path(str(resources.files("lmforge") / "assets" / "tinyshakespeare.txt"))


def _earlier_run(run: Path) -> bool:
    """Whether `run` is an earlier demo's run folder, to be replaced (True), or absent or empty (False);
    anything else is not the demo's to delete."""
    if not run.exists() or run.is_dir() and not any(run.iterdir()):
        return False
    # A demo stopped in its first second leaves only tensorboard/ (made before metrics.jsonl).
    if run.is_dir() and (find_checkpoints(run) or (run / "metrics.jsonl").is_file() or (run / "tensorboard").is_dir()):
        return True
    raise UserError(f"{run} exists and is not an earlier demo's run (no step-* checkpoints, metrics.jsonl or tensorboard/); "
                    "pass another --out or move it away")


def run_demo(
    out: str | Path = "runs/demo",
    max_steps: int | None = None,
    device: str = "cpu",
    say: Callable[..., None] = print,
    resume: bool = False,
) -> dict[str, Any]:
    """The demo in `out`; `resume` goes on with the training of one stopped by Ctrl-C (its tokenizer and
    data are kept), where a new demo starts its own earlier run again from scratch."""
    t0 = time.perf_counter()
    # max_steps 0 is an error TrainConfig reports, not the default recipe; checked before any work is done.
    train = TRAIN.replace(device=device, max_steps=TRAIN.max_steps if max_steps is None else max_steps)
    out = Path(out)
    corpus = corpus_path()
    again = f"lmforge demo --resume{'' if out == Path('runs/demo') else f' --out {out}'}"
    # Every check before any work: a missing GPU or a folder in the way shows now, not after the tokenizer.
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device} asked for but CUDA is not available here; run the demo with --device cpu")
    resolve_device(device)  # an unknown name: one line with the choices
    if resume:
        if not find_checkpoints(out / "run") or not (out / "data" / "meta.json").is_file():
            raise UserError(f"{out} holds no stopped demo to resume (no checkpoint in {out / 'run'}); run `lmforge demo`")
        say(f"[1/5] tokenizer: kept from the stopped demo in {out / 'tokenizer'}")
        say(f"[2/5] prepare: kept from the stopped demo in {out / 'data'}")
    else:
        check_tokenizer_out(out / "tokenizer")
        check_data_out(out / "data")
        if _earlier_run(out / "run"):
            say(f"starting the demo again: removing the earlier demo's run {out / 'run'} (`{again}` would go on with it)")
            shutil.rmtree(out / "run")
        say(f"[1/5] tokenizer: byte-level BPE, {VOCAB_SIZE} tokens, on {corpus.name}")
        train_tokenizer([corpus], VOCAB_SIZE, out / "tokenizer")
        say("[2/5] prepare: tokenize, last 10% of the text held out for validation")
        prepare([corpus], out / "tokenizer", out / "data", val_fraction=0.1)
    say("[3/5] pretrain")
    try:
        run = pretrain(out / "data", out / "run", MODEL, train, resume=resume, log=say)
    except Interrupted as e:  # pretrain's advice (`--resume`) is for its own verb: say the demo's
        where = f"checkpoint saved to {e.checkpoint}" if e.checkpoint else "no new step to save"
        raise UserError(f"demo interrupted at step {e.step}; {where}; continue with `{again}`") from None
    say("[4/5] evaluate on the whole validation split")
    ev = evaluate_lm(run.checkpoint, out / "data", split="val", device=device)
    say(f"validation: {ev['loss']:.4f} nats/token, {ev['bpb']:.4f} bits/byte, perplexity {ev['perplexity']:.2f}")
    say(f"loss curve: {run.plot}")
    say(f"[5/5] sample ({SAMPLE_TOKENS} tokens, temperature 0.8, top-k 200, seed 1337)")
    lm = load(run.checkpoint, device=device)
    sample = PROMPT + lm.generate(PROMPT, SAMPLE_TOKENS, temperature=0.8, top_k=200, seed=1337, stop_at_eot=False)
    say("-" * 60 + "\n" + sample + "\n" + "-" * 60)
    seconds = time.perf_counter() - t0
    say(f"demo finished in {seconds:.1f}s; checkpoint {run.checkpoint}")
    return {
        "val_loss": ev["loss"],
        "val_bpb": ev["bpb"],
        "seconds": seconds,
        "sample": sample,
        "checkpoint": str(run.checkpoint),
        "plot": str(run.plot),
    }
