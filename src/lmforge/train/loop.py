"""`fit`: the one training loop that pretraining and fine-tuning share.

A run is a pure function of its configs: batch (step, micro) comes from (seed, step, micro) and
dropout from (seed, step), so a run killed and resumed from any checkpoint ends with exactly the
weights of one that was never interrupted. What is trained on, and how a batch becomes a loss,
is the `objective`'s business (see `objectives.py` and `lmforge.finetune`).
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from lmforge.checkpoint import load_model
from lmforge.checkpoint.store import load_optimizer_state
from lmforge.config import TrainConfig
from lmforge.model import Transformer
from lmforge.model.losses import bits_per_byte
from lmforge.tokenizer import Tokenizer
from lmforge.train.checkpointing import Checkpointer
from lmforge.train.metrics import MetricsLog, plot_loss
from lmforge.train.optim import build_optimizer, lr_at
from lmforge.utils.device import autocast, autocast_dtype, resolve_device
from lmforge.utils.errors import UserError

Batch = dict[str, torch.Tensor]


class TrainingObjective(Protocol):
    """What `fit` needs from a task: batches as a function of (step, micro), a loss, a validation loss."""

    def batch(self, source: Any, batch_size: int, step: int, micro: int = 0) -> Batch: ...
    def val_batches(self, source: Any, batch_size: int, n_batches: int) -> list[Batch]: ...
    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor: ...
    def evaluate(self, model: nn.Module, batches: list[Batch], device: torch.device, amp: torch.dtype | None) -> float: ...


@dataclass
class RunResult:
    out: Path
    checkpoint: Path
    step: int
    train_loss: float
    val_loss: float | None
    val_bpb: float | None
    seconds: float
    tokens_per_s: float
    params: int
    plot: Path
    trainable_params: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in self.__dict__.items()}


def fit(
    net: Transformer,
    objective: TrainingObjective,
    tokenizer: Tokenizer,
    train: TrainConfig,
    out: str | Path,
    train_source: Any,
    val_source: Any = None,
    *,
    tokens_per_sample: int,
    resume: bool = False,
    state: dict[str, Any] | None = None,
    val_tokens_bytes: tuple[int, int] | None = None,
    describe: str = "",
    progress: bool = True,
    log: Callable[[str], None] = print,
    t0: float | None = None,
) -> RunResult:
    """Train `net` (weights already initialised or loaded) on `objective` and write RUN/step-N checkpoints.

    `tokens_per_sample` is what one sample contributes to the tokens/s rate; `state` is recorded
    in every checkpoint's trainer state; `val_tokens_bytes` (tokens, UTF-8 bytes of the validation
    text), when given, turns the validation loss into bits per byte. With `resume`, weights and optimizer continue from the latest
    checkpoint in `out`.
    """
    t0 = time.perf_counter() if t0 is None else t0
    out = Path(out)
    checkpoints = Checkpointer(out, train.keep_checkpoints)
    resume_from = checkpoints.resume_point(resume, net.config)
    start_step = int(resume_from.trainer_state["step"]) if resume_from else 0

    device = resolve_device(train.device)
    amp = autocast_dtype(device, train.dtype)
    if train.threads:
        torch.set_num_threads(train.threads)
    net = net.to(device)
    optimizer = build_optimizer(net, train, device)
    if resume_from is not None:
        loaded, _ = load_model(resume_from.path, device)
        net.load_state_dict(loaded.state_dict())
        optimizer.load_state_dict(load_optimizer_state(resume_from))
    compiled = torch.compile(net) if (train.compile if train.compile is not None else device.type == "cuda") else net
    val_batches = objective.val_batches(val_source, train.batch_size, train.eval_batches) if val_source is not None else None

    out.mkdir(parents=True, exist_ok=True)
    metrics = MetricsLog(out, tensorboard=train.tensorboard)
    metrics.truncate_after(start_step)
    tokens_per_step = train.batch_size * train.grad_accum * tokens_per_sample
    total = sum(p.numel() for p in net.parameters())  # parameters() yields a tied tensor once
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    c = net.config
    log(
        f"model: {net.num_params():,} parameters"
        + (f" ({trainable:,} of {total:,} trainable)" if trainable < total else "")
        + f" ({_fmt_flops(net.flops_per_token(tokens_per_sample))} FLOPs/token), "
        f"{c.n_layer} layers x {c.n_embd} wide, context {c.context_length}, vocab {c.vocab_size}"
    )
    log(
        f"train: {train.max_steps} steps x {tokens_per_step:,} tokens on {device}"
        f"{' (bf16 autocast)' if amp else ' (fp32)'}; {describe}"
        + (f", resuming at step {start_step}" if start_step else "")
    )

    def validate(step: int) -> tuple[float, float | None] | None:
        if val_batches is None:
            return None
        loss = objective.evaluate(compiled, val_batches, device, amp)
        bpb = bits_per_byte(loss, *val_tokens_bytes) if val_tokens_bytes else None
        metrics.log({"kind": "val", "step": step, "val_loss": loss, "val_bpb": bpb, "val_ppl": math.exp(min(loss, 700.0))})
        return loss, bpb

    def checkpoint(step: int) -> Path:
        run_state = {"tokens": step * tokens_per_step, "train": train.to_dict(), **(state or {})}
        return checkpoints.save(step, net, tokenizer, run_state, optimizer.state_dict(), metrics.path)

    trainable_params = [p for p in net.parameters() if p.requires_grad]
    step, last_loss, last_val = start_step, float("nan"), None
    bar = tqdm(total=train.max_steps, initial=start_step, desc="train", unit="step", disable=not progress, dynamic_ncols=True)
    window_t, window_tokens = time.perf_counter(), 0
    tokens_per_s = 0.0
    net.train()
    with _stop_on_interrupt() as stop:
        while step < train.max_steps and not stop.is_set():
            lr = lr_at(step, train)
            for group in optimizer.param_groups:
                group["lr"] = lr
            torch.manual_seed(train.seed * 1_000_003 + step)  # dropout masks are a function of the step
            loss_sum = torch.zeros((), device=device)
            for micro in range(train.grad_accum):
                batch = objective.batch(train_source, train.batch_size, step, micro)
                batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                with autocast(device, amp):
                    loss = objective.loss(compiled, batch) / train.grad_accum
                loss.backward()
                loss_sum += loss.detach()
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable_params, train.grad_clip) if train.grad_clip else None
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            window_tokens += tokens_per_step

            if step % train.log_interval == 0 or step == train.max_steps:
                last_loss = loss_sum.item()
                now = time.perf_counter()
                tokens_per_s = window_tokens / (now - window_t)
                window_t, window_tokens = now, 0
                row = {"kind": "train", "step": step, "tokens": step * tokens_per_step, "loss": last_loss, "lr": lr,
                       "tokens_per_s": tokens_per_s, "elapsed_s": now - t0}
                if grad_norm is not None:
                    row["grad_norm"] = grad_norm.item()
                metrics.log(row)
                bar.set_postfix(loss=f"{last_loss:.3f}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)
            if train.eval_interval and (step % train.eval_interval == 0 or step == train.max_steps):
                last_val = validate(step)
                if last_val:
                    bpb = f", {last_val[1]:.4f} bits/byte" if last_val[1] is not None else ""
                    bar.write(f"step {step}: val loss {last_val[0]:.4f}{' nats/token' if val_tokens_bytes else ''}{bpb}")
            if step == train.max_steps or (train.ckpt_interval and step % train.ckpt_interval == 0):
                checkpoint(step)
            bar.update(1)
    bar.close()
    if step < train.max_steps:  # stopped by Ctrl-C / SIGTERM: keep the finished steps
        saved = checkpoint(step) if step > start_step else None
        metrics.close()
        where = f"checkpoint saved to {saved}" if saved else "no new step to save"
        raise UserError(f"interrupted at step {step}; {where}; continue with --resume")
    if start_step == train.max_steps:  # resumed a finished run: nothing to train, report it
        last_val = validate(step)
    metrics.close()
    plot = plot_loss(metrics.path, out / "loss.png")
    return RunResult(
        out=out,
        checkpoint=checkpoints.latest(),
        step=step,
        train_loss=last_loss,
        val_loss=last_val[0] if last_val else None,
        val_bpb=last_val[1] if last_val else None,
        seconds=time.perf_counter() - t0,
        tokens_per_s=tokens_per_s,
        params=net.num_params(),
        plot=plot,
        trainable_params=trainable,
    )


@contextlib.contextmanager
def _stop_on_interrupt() -> Iterator[threading.Event]:
    """Turn the first Ctrl-C or SIGTERM into a request to stop after the current step.

    Stopping between steps, never inside one, is what lets the interrupted run save a checkpoint
    whose weights, optimizer state and step number agree. A second Ctrl-C interrupts at once.
    """
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def request_stop(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _fmt_flops(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"
