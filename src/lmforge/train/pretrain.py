"""`pretrain`: the training loop that turns token shards into a checkpoint directory.

A run is a pure function of its configs: weights are seeded by `train.seed`, batch (step, micro)
by (seed, step, micro) and dropout by (seed, step). So a run killed and resumed from any
checkpoint ends with exactly the weights of one that was never interrupted.
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from tqdm.auto import tqdm

from lmforge.checkpoint import load_model
from lmforge.checkpoint.store import load_optimizer_state
from lmforge.config import ModelConfig, TrainConfig, preset
from lmforge.data import load_meta
from lmforge.data.parallel import load_parallel_meta
from lmforge.model import Transformer
from lmforge.model.losses import bits_per_byte
from lmforge.tokenizer import Tokenizer
from lmforge.train.checkpointing import Checkpointer
from lmforge.train.metrics import MetricsLog, plot_loss
from lmforge.train.objectives import Objective
from lmforge.train.optim import build_optimizer, lr_at
from lmforge.utils.device import autocast, autocast_dtype, resolve_device
from lmforge.utils.errors import UserError


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

    def to_dict(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in self.__dict__.items()}


def pretrain(
    data: str | Path,
    out: str | Path,
    model: ModelConfig | str | None = None,
    train: TrainConfig | None = None,
    resume: bool = False,
    objective: str = "causal",
    progress: bool = True,
    log=print,
) -> RunResult:
    """Train a model on prepared shards in `data`, writing checkpoints under `out`.

    `model` is a config or a preset name (default: `ModelConfig()`, the GPT-2 124M shape); its
    vocab_size, when unset, is the data's tokenizer's. `objective` is `causal` (decoders),
    `mlm` / `mlm+nsp` (encoders, e.g. `bert-base`) or `seq2seq` (encoder-decoders, on parallel
    data from `prepare_parallel`). With `resume`, continue from the latest checkpoint in `out`.
    """
    t0 = time.perf_counter()
    train = train or TrainConfig()
    out = Path(out)
    meta = load_parallel_meta(data) or load_meta(data)
    tokenizer = Tokenizer.load(data)
    model_cfg = _resolve_model_config(model, meta)
    task = Objective(objective, model_cfg, tokenizer, train.seed, parallel_data=meta.get("kind") == "parallel")
    seq_len = train.seq_len or model_cfg.context_length
    if seq_len > model_cfg.context_length:
        raise UserError(f"train.seq_len {seq_len} exceeds model.context_length {model_cfg.context_length}; lower one or raise the other")

    checkpoints = Checkpointer(out, train.keep_checkpoints)
    resume_from = checkpoints.resume_point(resume, model_cfg)
    start_step = int(resume_from.trainer_state["step"]) if resume_from else 0

    device = resolve_device(train.device)
    amp = autocast_dtype(device, train.dtype)
    if train.threads:
        torch.set_num_threads(train.threads)
    torch.manual_seed(train.seed)
    net = Transformer(model_cfg).to(device)
    optimizer = build_optimizer(net, train, device)
    if resume_from is not None:
        loaded, _ = load_model(resume_from.path, device)
        net.load_state_dict(loaded.state_dict())
        optimizer.load_state_dict(load_optimizer_state(resume_from))
    compiled = torch.compile(net) if (train.compile if train.compile is not None else device.type == "cuda") else net

    train_source = task.open(data, "train", seq_len)
    val_batches, val_ratio = None, None
    val_source = task.open(data, "val", seq_len, required=False) if train.eval_interval else None
    if val_source is not None:
        val_batches = task.val_batches(val_source, train.batch_size, train.eval_batches)
        if task.reports_bpb:
            val_ratio = meta["splits"]["val"]["tokens"], meta["splits"]["val"]["bytes"]

    out.mkdir(parents=True, exist_ok=True)
    metrics = MetricsLog(out, tensorboard=train.tensorboard)
    metrics.truncate_after(start_step)
    tokens_per_step = train.batch_size * train.grad_accum * seq_len
    log(
        f"model: {net.num_params():,} parameters ({_fmt_flops(net.flops_per_token(seq_len))} FLOPs/token), "
        f"{model_cfg.n_layer} layers x {model_cfg.n_embd} wide, context {model_cfg.context_length}, vocab {model_cfg.vocab_size}"
    )
    log(
        f"train: {train.max_steps} steps x {tokens_per_step:,} tokens on {device}"
        f"{' (bf16 autocast)' if amp else ' (fp32)'}; {task.describe(meta)}"
        + (f", resuming at step {start_step}" if start_step else "")
    )

    def validate(step: int) -> tuple[float, float | None] | None:
        if val_batches is None:
            return None
        loss = task.evaluate(compiled, val_batches, device, amp)
        bpb = bits_per_byte(loss, *val_ratio) if task.reports_bpb else None
        metrics.log({"kind": "val", "step": step, "val_loss": loss, "val_bpb": bpb, "val_ppl": math.exp(loss)})
        return loss, bpb

    def checkpoint(step: int) -> Path:
        state = {"tokens": step * tokens_per_step, "train": train.to_dict(), "data": str(data), "objective": objective}
        return checkpoints.save(step, net, tokenizer, state, optimizer.state_dict(), metrics.path)

    step, last_loss, last_val = start_step, float("nan"), None
    bar = tqdm(total=train.max_steps, initial=start_step, desc="pretrain", unit="step", disable=not progress, dynamic_ncols=True)
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
                batch = task.batch(train_source, train.batch_size, step, micro)
                batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                with autocast(device, amp):
                    loss = task.loss(compiled, batch) / train.grad_accum
                loss.backward()
                loss_sum += loss.detach()
            grad_norm = torch.nn.utils.clip_grad_norm_(net.parameters(), train.grad_clip) if train.grad_clip else None
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
                    bar.write(f"step {step}: val loss {last_val[0]:.4f} nats/token{bpb}")
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


def _resolve_model_config(model: ModelConfig | str | None, meta: dict) -> ModelConfig:
    cfg = preset(model) if isinstance(model, str) else (model or ModelConfig())
    if cfg.vocab_size is None:
        return cfg.replace(vocab_size=meta["vocab_size"])
    if cfg.vocab_size < meta["vocab_size"]:
        raise UserError(
            f"model.vocab_size {cfg.vocab_size} is smaller than the data's tokenizer ({meta['vocab_size']}); "
            "drop --model.vocab_size to take it from the data"
        )
    return cfg


def _fmt_flops(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"
