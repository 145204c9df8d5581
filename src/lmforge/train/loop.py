"""`fit`: the one training loop that pretraining and fine-tuning share.

A run is a pure function of its configs: batch (step, micro) and its dropout masks come from
(seed, step, micro), so a run killed and resumed from any checkpoint ends with exactly the
weights of one that was never interrupted, and W processes that split a step's micro-batches
train what one process that takes them all trains (`distributed.py`). What is trained on, and how
a batch becomes a loss, is the `objective`'s business (see `objectives.py` and `lmforge.finetune`).

A step that ends with a nan or inf loss (or gradient norm) never reaches a checkpoint: the run
stops naming the step, or skips it with `train.skip_nonfinite`.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from lmforge.checkpoint import find_checkpoints
from lmforge.config import TrainConfig
from lmforge.data.loader import Prefetcher
from lmforge.model import Transformer
from lmforge.model.losses import bits_per_byte
from lmforge.tokenizer import Tokenizer
from lmforge.train.checkpointing import Checkpointer
from lmforge.train.distributed import (
    World, all_reduce, barrier, grad_sync, init_world, local_tensor, micro_seed, unsharded_root, wrap,
)
from lmforge.train.float8 import refresh_float8_scales, to_float8
from lmforge.train.metrics import MetricsLog, NoMetrics, plot_loss
from lmforge.train.objectives import weighted_mean_loss
from lmforge.train.optim import build_optimizer, lr_at
from lmforge.utils.device import autocast, autocast_dtype, compile_module, replays_cuda_graphs
from lmforge.utils.errors import UserError
from lmforge.utils.fs import ensure_dir

Batch = dict[str, torch.Tensor]


class TrainingObjective(Protocol):
    """What `fit` needs from a task: batches as a function of (step, micro), a loss, a validation loss."""

    def batch(self, source: Any, batch_size: int, step: int, micro: int = 0) -> Batch: ...
    def val_batches(self, source: Any, batch_size: int, n_batches: int) -> list[Batch]: ...
    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor: ...
    def weight(self, batch: Batch) -> int: ...  # how many predictions the batch's mean loss averages over
    # Optional `token_weighted` (default True): False gives a step's micro-batches equal shares instead.


class Interrupted(UserError):
    """Training stopped by Ctrl-C or SIGTERM between two steps, after saving what it had (`checkpoint`).

    Also raised when the signal came in the run's last step, its final validation or checkpoint and
    the caller's handler, which `fit` passes it on to, raises KeyboardInterrupt (Python's for
    Ctrl-C, the CLI's for SIGTERM): the run is complete then, and `checkpoint` its last one.
    """

    every_process = True  # torchrun passes the signal to every process

    def __init__(self, step: int, checkpoint: Path | None) -> None:
        where = f"checkpoint saved to {checkpoint}" if checkpoint else "no new step to save"
        super().__init__(f"interrupted at step {step}; {where}; continue with --resume")
        self.step, self.checkpoint = step, checkpoint


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
    data_wait_share: float | None = None  # share of step time spent waiting for batches
    skipped_steps: int = 0  # steps dropped by --train.skip_nonfinite

    def to_dict(self) -> dict[str, Any]:
        """The result as JSON values: paths as strings, and no loss at all (a last step skipped by
        --train.skip_nonfinite) or a rate that is not finite as null, which JSON has; NaN it has not."""
        def plain(v: Any) -> Any:
            if isinstance(v, Path):
                return str(v)
            return None if isinstance(v, float) and not math.isfinite(v) else v

        return {k: plain(v) for k, v in self.__dict__.items()}


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
    checkpoint in `out`. Under torchrun every process calls `fit` alike; each step then takes
    `batch_size * grad_accum * world_size` sequences (see `lmforge.train.distributed`), and only
    rank 0 logs and writes files.
    """
    t0 = time.perf_counter() if t0 is None else t0
    threads = torch.get_num_threads()  # `train.threads` holds for this run only, not the rest of a Python session
    try:
        with init_world(train.device) as (world, device):
            if not world.main:
                progress, log = False, _silent
            return _fit(world, device, net, objective, tokenizer, train, Path(out), train_source, val_source,
                        tokens_per_sample, resume, state, val_tokens_bytes, describe, progress, log, t0)
    finally:
        torch.set_num_threads(threads)


def _fit(world: World, device: torch.device, net: Transformer, objective: TrainingObjective, tokenizer: Tokenizer,
         train: TrainConfig, out: Path, train_source: Any, val_source: Any, tokens_per_sample: int, resume: bool,
         state: dict[str, Any] | None, val_tokens_bytes: tuple[int, int] | None, describe: str, progress: bool,
         log: Callable[[str], None], t0: float) -> RunResult:
    checkpoints = Checkpointer(out, train.keep_checkpoints, world)
    resume_from = checkpoints.resume_point(resume, net.config, tokenizer, train, (state or {}).get("objective"))
    start_step = resume_from.trainer_state["step"] if resume_from else 0  # checked to be an int

    amp = autocast_dtype(device, train.dtype)
    if train.threads:
        torch.set_num_threads(train.threads)
    net = net.to(device)
    fp8_sharded = train.fp8 and world.distributed and train.parallel == "fsdp"  # weights all-gathered in float8
    if train.fp8:
        log(f"fp8: {len(to_float8(net, device, sharded=fp8_sharded))} linear layers multiply in float8"
            + (", their weights all-gathered in float8" if fp8_sharded else ""))
    compiling = train.compile if train.compile is not None else device.type == "cuda"
    # The model and its loss compile as one graph, so that the compiler fuses the head's output into
    # the cross-entropy (no fp32 copy of the logits) and the heads of fine-tuning tasks compile too.
    loss_fn = compile_module(objective.loss, train.compile_mode) if compiling else objective.loss
    graphed = compiling and replays_cuda_graphs(train.compile_mode, device)  # each micro-batch starts a new step
    if graphed and train.grad_accum > 1:
        # The first micro-batch's gradients would be the CUDA graph's output memory, which the next
        # micro-batch's replay overwrites before they are accumulated into.
        raise UserError(f"--train.compile_mode {train.compile_mode} replays CUDA graphs, which cannot accumulate gradients "
                        f"over {train.grad_accum} micro-batches; use --train.grad_accum 1 or --train.compile_mode default")
    probe = None
    if world.distributed and train.parallel == "ddp":
        probe = {k: v.to(device) for k, v in objective.batch(train_source, train.batch_size, start_step, 0).items()}
    with autocast(device, amp):  # DDP's probe for unused parameters runs one micro-batch as training does
        step_loss = wrap(net, loss_fn, train.parallel, world, device, probe, objective.loss)  # FSDP2 shards `net` in place
    optimizer = build_optimizer(net, train, device)
    if resume_from is not None:
        checkpoints.restore(resume_from, net, optimizer, device)
    val_batches = objective.val_batches(val_source, train.batch_size, train.eval_batches) if val_source is not None else None

    if world.main:
        ensure_dir(out)
    metrics = MetricsLog(out, tensorboard=train.tensorboard) if world.main else NoMetrics()
    if world.main and resume_from is not None and not metrics.path.exists() and (resume_from.path / "metrics.jsonl").exists():
        shutil.copyfile(resume_from.path / "metrics.jsonl", metrics.path)  # a checkpoint copied out of its run
    metrics.truncate_after(start_step)
    sequences_per_step = train.batch_size * train.grad_accum * world.size
    tokens_per_step = sequences_per_step * tokens_per_sample
    total, trainable = net.num_params(), net.num_params(trainable_only=True)  # counted alike: a share of the same total
    c = net.config
    log(
        f"model: {total:,} parameters"
        + (f" ({trainable:,} of {total:,} trainable)" if trainable < total else "")
        + f" ({_fmt_flops(net.flops_per_token(tokens_per_sample))} FLOPs/token), "
        f"{c.n_layer} layers x {c.n_embd} wide, context {c.context_length}, vocab {c.vocab_size}"
    )
    log(
        f"train: {train.max_steps} steps x {tokens_per_step:,} tokens on {device}"
        f"{' (bf16 autocast)' if amp else ' (fp32)'}; {describe}"
        + (f", resuming at step {start_step}" if start_step else "")
    )
    if world.distributed:
        log(f"parallel: {world.size} processes ({train.parallel}); {sequences_per_step} sequences per step = "
            f"{train.batch_size} per micro-batch x {train.grad_accum} micro-batches x {world.size} processes")
    start_tokens = start_step * tokens_per_step
    if resume_from is not None:
        _warn_if_run_changed(resume_from.trainer_state, train, sequences_per_step, c.context_length, log)
        saved_tokens = resume_from.trainer_state.get("tokens")
        if type(saved_tokens) is int and saved_tokens >= 0:  # else a checkpoint from before tokens were counted
            start_tokens = saved_tokens

    def tokens_at(step: int) -> int:
        """Tokens in the batches of steps 1..`step` (skipped ones too), counted on over a resume with another batch."""
        return start_tokens + (step - start_step) * tokens_per_step

    def validate(step: int, log_it: bool = True) -> tuple[float, float | None] | None:
        if val_batches is None:
            return None
        with unsharded_root(step_loss):  # every rank evaluates (FSDP2 needs all of them); rank 0 logs
            loss = weighted_mean_loss(loss_fn, objective.weight, net, val_batches, device, amp)
        bpb = bits_per_byte(loss, *val_tokens_bytes) if val_tokens_bytes else None
        if log_it:
            metrics.log({"kind": "val", "step": step, "val_loss": loss, "val_bpb": bpb, "val_ppl": math.exp(min(loss, 700.0))})
        return loss, bpb

    saved: dict[int, Path] = {}

    def checkpoint(step: int) -> Path:
        """RUN/step-N, written once: an interrupt right after a checkpoint step does not write it again."""
        if step not in saved:
            run_state = {"tokens": tokens_at(step), "world_size": world.size, "train": train.to_dict(), **(state or {})}
            saved[step] = checkpoints.save(step, net, tokenizer, run_state, optimizer, metrics.path)
        return saved[step]

    # A non-finite loss is recorded on the device as the first step it happened (no host sync) and
    # read at check points: every step on CPU or with skip_nonfinite, else at logging and before
    # every checkpoint, so that a checkpoint never holds weights a non-finite step touched.
    none_bad = float(train.max_steps + 1)
    first_bad = torch.full((), none_bad, dtype=torch.float64, device=device)
    check_every_step = _check_every_step(device, train)

    def agreed(stop_requested: bool) -> tuple[int | None, bool]:
        """(first non-finite step of any rank or None, whether any rank was asked to stop)."""
        flags = torch.stack([first_bad, torch.tensor(-float(stop_requested), dtype=torch.float64, device=device)])
        flags = all_reduce(flags, world, "min").tolist()
        return (int(flags[0]) if flags[0] < none_bad else None), flags[1] < 0

    def nonfinite_error(bad: int, loss: float | None) -> UserError:
        if loss is None:
            what = "not finite (nan or inf)"
        elif math.isfinite(loss):
            what = f"{loss:.4f} but its gradient norm is not finite"
        else:
            what = "nan" if math.isnan(loss) else "inf"
        saved = find_checkpoints(out)
        keep = f"the last good checkpoint is {saved[-1]}" if saved else "no checkpoint was written"
        return UserError(f"loss is {what} at step {bad}; lower --train.lr or pass --train.skip_nonfinite true to skip "
                         f"such steps; {keep}")

    micros = world.micro_batches(train.grad_accum)
    prefetch = Prefetcher(
        lambda s, m: objective.batch(train_source, train.batch_size, s, m),
        ((s, m) for s in range(start_step, train.max_steps) for m in micros),
        depth=2 * train.grad_accum, pin=device.type == "cuda",
    )
    trainable_params = [p for p in net.parameters() if p.requires_grad]
    token_weighted = getattr(objective, "token_weighted", True)  # else the micro-batches share a step equally
    equal = [1 / len(micros)] * len(micros)
    step, last_loss, last_val, skipped = start_step, float("nan"), None, 0
    bar = tqdm(total=train.max_steps, initial=start_step, desc="train", unit="step", disable=not progress, dynamic_ncols=True)

    def say(line: str) -> None:  # a line between the bar's redraws, written by `log` (to stderr under --json)
        with tqdm.external_write_mode():
            log(line)

    window_t, window_tokens, window_wait, window_busy = time.perf_counter(), 0, 0.0, 0.0
    total_wait, total_busy = 0.0, 0.0
    tokens_per_s = 0.0
    stopping = False
    net.train()
    try:
        with _stop_on_interrupt() as stop:
            while step < train.max_steps and not stopping:
                step_t = time.perf_counter()
                lr = lr_at(step, train)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                loss_sum = torch.zeros((), device=device)
                t = time.perf_counter()
                batches = [prefetch.next((step, micro)) for micro in micros]
                wait = time.perf_counter() - t
                shares = _shares([objective.weight(b) for b in batches], world, device) if token_weighted else equal
                for i, (micro, batch) in enumerate(zip(micros, batches)):
                    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                    torch.manual_seed(micro_seed(train.seed, step, micro))  # dropout: a function of (step, micro)
                    if graphed:
                        torch.compiler.cudagraph_mark_step_begin()
                    with grad_sync(step_loss, i == len(micros) - 1):  # one gradient all-reduce per step
                        with autocast(device, amp):
                            loss = step_loss(batch) * shares[i]
                        loss.backward()
                    loss_sum += loss.detach()
                # Measured whether or not it clips (one fused reduction): a finite loss can still give a
                # nan or overflowing gradient, which must not reach the weights.
                grad_norm = torch.nn.utils.get_total_norm([p.grad for p in trainable_params if p.grad is not None])
                if train.grad_clip:
                    torch.nn.utils.clip_grads_with_norm_(trainable_params, train.grad_clip, grad_norm)
                grad_norm = local_tensor(grad_norm)  # the whole norm (FSDP2 gives a DTensor)
                finite = torch.isfinite(loss_sum) & torch.isfinite(grad_norm)
                first_bad = torch.where(finite | (first_bad < none_bad), first_bad, float(step + 1))
                done = step + 1
                logging = done % train.log_interval == 0 or done == train.max_steps
                saving = done == train.max_steps or (train.ckpt_interval and done % train.ckpt_interval == 0)
                skip = False
                if check_every_step or logging or saving:
                    bad, stopping = agreed(stop.is_set())
                else:  # one process reads its own stop request; several agree on one at the next check
                    bad, stopping = None, stop.is_set() and not world.distributed
                if bad is not None:
                    loss_now = all_reduce(loss_sum.clone(), world).item() / world.size if bad == done else None
                    if not train.skip_nonfinite:
                        raise nonfinite_error(bad, loss_now)
                    # Skip: drop the step's gradients; the next step takes the next batches.
                    first_bad.fill_(none_bad)
                    skip, skipped = True, skipped + 1
                    metrics.log({"kind": "skipped", "step": done, "loss": str(loss_now)})
                    say(f"step {done}: loss is {loss_now}; step skipped (--train.skip_nonfinite)")
                if not skip:
                    optimizer.step()
                    if fp8_sharded:
                        refresh_float8_scales(net)
                optimizer.zero_grad(set_to_none=True)
                step = done
                window_tokens += tokens_per_step
                busy = time.perf_counter() - step_t
                window_busy, window_wait = window_busy + busy, window_wait + wait
                total_busy, total_wait = total_busy + busy, total_wait + wait

                if logging and not skip:
                    last_loss = all_reduce(loss_sum, world).item() / world.size
                    now = time.perf_counter()
                    tokens_per_s = window_tokens / (now - window_t)
                    row = {"kind": "train", "step": step, "tokens": tokens_at(step), "loss": last_loss, "lr": lr,
                           "grad_norm": grad_norm.item(), "tokens_per_s": tokens_per_s,
                           "data_wait": window_wait / max(window_busy, 1e-9), "elapsed_s": now - t0}
                    window_t, window_tokens, window_wait, window_busy = now, 0, 0.0, 0.0
                    metrics.log(row)
                    bar.set_postfix(loss=f"{last_loss:.3f}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)
                if train.eval_interval and (step % train.eval_interval == 0 or step == train.max_steps):
                    last_val = validate(step)
                    if last_val:
                        bpb = f", {last_val[1]:.4f} bits/byte" if last_val[1] is not None else ""
                        say(f"step {step}: val loss {last_val[0]:.4f}{' nats/token' if val_tokens_bytes else ''}{bpb}")
                if saving:
                    checkpoint(step)
                bar.update(1)
            bar.close()
            if step < train.max_steps:  # stopped by Ctrl-C / SIGTERM: keep the finished steps
                bad, _ = agreed(False)
                if bad is not None:
                    raise nonfinite_error(bad, None)
                raise Interrupted(step, checkpoint(step) if step > start_step else None)
        if start_step == train.max_steps:  # resumed a finished run: nothing to train; report how it ended
            last_val = validate(step, log_it=False)  # the run logged this step's validation when it trained it
            last_train = metrics.last("train")
            last_loss = last_train["loss"] if last_train else last_loss
    finally:
        bar.close()
        prefetch.close()
        metrics.close()
    plot = plot_loss(metrics.path, out / "loss.png") if world.main else out / "loss.png"
    barrier(world)
    result = RunResult(
        out=out,
        checkpoint=checkpoints.latest(),
        step=step,
        train_loss=last_loss,
        val_loss=last_val[0] if last_val else None,
        val_bpb=last_val[1] if last_val else None,
        seconds=time.perf_counter() - t0,
        tokens_per_s=tokens_per_s,
        params=total,
        plot=plot,
        trainable_params=trainable,
        data_wait_share=total_wait / total_busy if total_busy else None,
        skipped_steps=skipped,
    )
    if stop.signum is not None:
        # The signal came too late to stop the run (in its last step, final validation or checkpoint),
        # which is complete and saved: the caller's handler, back in place, gets it now, as if it had
        # come just after the run, so that it is not lost (`timeout` around a bench must still end it).
        try:
            signal.raise_signal(stop.signum)
        except KeyboardInterrupt:  # an interrupt (Python's Ctrl-C, the CLI's SIGTERM): say what was saved
            raise Interrupted(step, result.checkpoint) from None
    return result


def _shares(weights: list[int], world: World, device: torch.device) -> list[float] | list[torch.Tensor]:
    """Each micro-batch's share of the step: its predictions (`objective.weight`) over the whole
    step's, on every rank, so that a step's loss and gradient are the mean over its predictions
    however they are split into micro-batches and processes. 1 / grad_accum would weight a
    micro-batch with few targets (a short SFT reply, a short summary, a lightly masked MLM batch)
    as much as one with many: transformers' gradient-accumulation fix (num_items_in_batch, 2024).
    DDP and FSDP2 average the ranks' gradients, hence the factor world.size. Several processes
    agree on the total with one small all-reduce, kept on the device (no host sync).
    """
    if not world.distributed:
        total = max(sum(weights), 1)  # a micro-batch without predictions has loss 0 (`lm_loss`) and share 0
        return [w / total for w in weights]
    # torch.full fills on the device; torch.tensor(value, device=cuda) would copy from pageable memory and wait.
    total = all_reduce(torch.full((), float(sum(weights)), dtype=torch.float64, device=device), world).clamp_(min=1)
    return [(w * world.size / total).float() for w in weights]


def _check_every_step(device: torch.device, train: TrainConfig) -> bool:
    """Read the non-finite flag every step (a host sync) or only at log and checkpoint steps (CUDA)."""
    return device.type != "cuda" or train.skip_nonfinite


def _warn_if_run_changed(trainer_state: dict[str, Any], train: TrainConfig, sequences_per_step: int, context_length: int,
                         log: Callable[[str], None]) -> None:
    """Resuming with another global batch (a new world size, say), micro-batch, seed or sequence length is
    allowed, but the batches from there on are not the ones the run would have trained on: say so."""
    prev = trainer_state.get("train")
    if not isinstance(prev, dict):
        return
    if "batch_size" in prev:
        before = prev["batch_size"] * prev.get("grad_accum", 1) * trainer_state.get("world_size", 1)
        if before != sequences_per_step:
            log(f"warning: the checkpoint took {before} sequences per step and this run takes {sequences_per_step}; "
                "for the same run keep batch_size x grad_accum x processes equal")
        elif prev["batch_size"] != train.batch_size:  # a micro-batch's sequences are drawn by its index
            log(f"warning: the checkpoint drew micro-batches of {prev['batch_size']} sequences and this run draws "
                f"{train.batch_size}, other sequences for the same {before} per step; for the same run keep "
                f"--train.batch_size {prev['batch_size']} and trade processes for --train.grad_accum")
    # The seed chooses each step's batch and dropout masks; seq_len (None: the context) cuts the windows.
    for key, before, now in (("seed", prev.get("seed"), train.seed),
                             ("seq_len", prev.get("seq_len") or context_length, train.seq_len or context_length)):
        if key in prev and before != now:
            log(f"warning: the checkpoint was trained with --train.{key} {before} and this run uses {now}; "
                f"for the same run resume with --train.{key} {before}")


def _silent(*args: Any, **kwargs: Any) -> None:
    pass


class _StopRequest:
    """The first Ctrl-C or SIGTERM that came while training (`signum`), or none."""

    signum: int | None = None

    def is_set(self) -> bool:
        return self.signum is not None


@contextlib.contextmanager
def _stop_on_interrupt() -> Iterator[_StopRequest]:
    """Turn the first Ctrl-C or SIGTERM into a request to stop after the current step.

    Stopping between steps, never inside one, is what lets the interrupted run save a checkpoint
    whose weights, optimizer state and step number agree. A second Ctrl-C interrupts at once. A
    request that comes too late to stop the run (in its last step) is passed on as `fit` returns.
    """
    stop = _StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def request_stop(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        stop.signum = signum

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
