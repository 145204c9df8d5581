"""Data parallelism for `fit`: the process group, DDP / FSDP2 wrapping, and who takes which micro-batch.

One process is the same code with world size 1 (nothing is wrapped, no collective runs). Under
`torchrun`, every process trains a copy of the model (DDP) or a shard of it (FSDP2, `fully_shard`).

How a global step is split. With world size W and `grad_accum` k, a step takes W * k micro-batches;
rank r takes micro-batches r*k .. r*k + k-1 of that step. Batches are a pure function of
(seed, step, micro), so W processes with accumulation k see exactly the samples of one process with
accumulation W * k, and average the same W * k losses: the runs agree to rounding, and a
checkpoint of one can be resumed by the other.

    step s:   micro 0 1 | 2 3 | 4 5        (W = 3, k = 2)
              rank  0   | 1   | 2

Gradients are only synchronised on a rank's last micro-batch (`no_sync` for DDP,
`set_requires_gradient_sync(False)` for FSDP2): one all-reduce (or reduce-scatter) per step.

The model is wrapped together with the objective's loss (`LossOf`), so the wrapper's forward is the
whole loss computation. That lets an objective call any method of the model (`encode`, `mlm`,
`task_logits`, ...) and still have DDP's reducer and FSDP2's root unshard see one forward.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from lmforge.utils.device import resolve_device
from lmforge.utils.errors import UserError


@dataclass(frozen=True)
class World:
    """This process's place in the run: rank 0 of 1 for a plain `python -m lmforge pretrain`."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0 writes metrics, logs, plots and the files of a checkpoint."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def micro_batches(self, grad_accum: int) -> range:
        """The global micro-batch indices this rank takes in every step."""
        return range(self.rank * grad_accum, (self.rank + 1) * grad_accum)


@contextlib.contextmanager
def init_world(device_name: str) -> Iterator[tuple[World, torch.device]]:
    """The world this process runs in (from torchrun's environment) and its device.

    With WORLD_SIZE > 1 the process group is created here (NCCL on CUDA, gloo on CPU) unless the
    caller already made one, and destroyed on exit if it was made here. Each process takes
    `cuda:LOCAL_RANK` when the device is `auto` or `cuda` (a device index is refused).
    """
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        yield World(), resolve_device(device_name)
        return
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name)
    if device.type == "cuda":
        if device.index is not None:
            raise UserError(f"--train.device {device_name} would put all {size} processes on one GPU; under torchrun "
                            "pass --train.device cuda (each process takes cuda:LOCAL_RANK) and choose GPUs with CUDA_VISIBLE_DEVICES")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    created = not dist.is_initialized()
    if created:
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    try:
        yield World(rank, size, local_rank), device
    finally:
        if created and dist.is_initialized():
            dist.destroy_process_group()


class LossOf(nn.Module):
    """A module whose forward is `loss(model, batch)`: what DDP / FSDP2 wrap (see the module docstring)."""

    def __init__(self, model: nn.Module, loss: Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]) -> None:
        super().__init__()
        self.model = model
        self._loss = loss

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self._loss(self.model, batch)


def wrap(net: nn.Module, loss: Callable, parallel: str, world: World, device: torch.device,
         probe: dict[str, torch.Tensor] | None = None, eager_loss: Callable | None = None) -> nn.Module:
    """The module `fit` calls as `step_loss(batch)`: plain for one process, else DDP or FSDP2.

    `loss(net, batch)` may be compiled; `eager_loss`, the same loss uncompiled, serves the DDP
    probe. FSDP2 shards every Transformer block as its own group and the rest (embeddings, final
    norm, heads; tied weights stay in one group) under the `LossOf` root. `net` is sharded in place:
    its parameters become DTensors, so build the optimizer after this call. `probe`, a batch, is
    used to find parameters the loss leaves without gradient (DDP only).
    """
    if not world.distributed:
        return LossOf(net, loss)
    if parallel == "ddp":
        # Heads an objective does not use (NSP for plain MLM, the LM head of a classifier) get no
        # gradient; DDP must then search the graph every step, which it only does when told to.
        ids = [device.index] if device.type == "cuda" else None
        find_unused = probe is not None and bool(unused_parameters(net, eager_loss or loss, probe))
        return nn.parallel.DistributedDataParallel(LossOf(net, loss), device_ids=ids, find_unused_parameters=find_unused)
    if parallel == "fsdp":
        try:  # here, not at the top: FSDP2 imports DTensor (about a second), which verbs that never train need not
            from torch.distributed.fsdp import fully_shard  # torch >= 2.6
        except ImportError:  # pragma: no cover - torch 2.4-2.5 export it only under _composable
            from torch.distributed._composable.fsdp import fully_shard
        for name in ("encoder_layers", "layers"):
            for block in getattr(net, name, None) or ():
                fully_shard(block)
        root = LossOf(net, loss)
        fully_shard(root)
        return root
    raise UserError(f"unknown train.parallel {parallel!r}; use ddp or fsdp")


def unused_parameters(net: nn.Module, loss: Callable, batch: dict[str, torch.Tensor]) -> list[str]:
    """Trainable parameters that one forward and backward of `loss` on `batch` gives no gradient."""
    trainable = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
    saved = [p.grad for _, p in trainable]
    for _, p in trainable:
        p.grad = None
    rng = torch.get_rng_state()
    loss(net, batch).backward()
    torch.set_rng_state(rng)
    unused = [n for n, p in trainable if p.grad is None]
    for (_, p), g in zip(trainable, saved):
        p.grad = g
    return unused


def grad_sync(model: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """Around one micro-batch's forward and backward: synchronise gradients only when `sync`."""
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()
    if isinstance(model, nn.parallel.DistributedDataParallel) and not sync:
        return model.no_sync()
    return contextlib.nullcontext()


@contextlib.contextmanager
def unsharded_root(model: nn.Module) -> Iterator[None]:
    """Let code call the inner model's methods directly (validation): FSDP2's root group is unsharded.

    The blocks unshard themselves in their own forward; only the root group (embeddings, norm,
    heads) is normally unsharded by the root's forward, which validation does not go through.
    """
    if hasattr(model, "unshard") and hasattr(model, "reshard"):
        model.unshard()
        try:
            yield
        finally:
            model.reshard()
    else:
        yield


def all_reduce(values: torch.Tensor, world: World, op: str = "sum") -> torch.Tensor:
    if world.distributed:
        dist.all_reduce(values, op={"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}[op])
    return values


def broadcast_object(obj: Any, world: World) -> Any:
    """Rank 0's `obj` on every rank."""
    if not world.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def micro_seed(seed: int, step: int, micro: int) -> int:
    """The torch seed (dropout) of micro-batch `micro` of step `step`: the same on any world size."""
    return int(np.random.SeedSequence([seed, step, micro]).generate_state(1, np.uint64)[0] >> 1)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole value of `t`: a DTensor (FSDP2 gradient norm) is gathered, a tensor returned as is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t
