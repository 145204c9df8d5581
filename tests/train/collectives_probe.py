"""Run under `torchrun --nproc-per-node 2`: records the gradient collectives of each micro-batch of a
step with accumulation 3, for DDP (its comm hook: one call per gradient bucket) and FSDP2 (its
reduce-scatters), and prints them from rank 0 as one JSON line."""

import json

import torch
import torch.distributed as dist

from lmforge.config import preset
from lmforge.model import Transformer
from lmforge.model.losses import lm_loss
from lmforge.train.distributed import World, grad_sync, wrap

REDUCE_SCATTERS = ("reduce_scatter_tensor", "reduce_scatter_single")  # FSDP2 calls the second from torch 2.12


def main() -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    calls: list[str] = []
    for name in REDUCE_SCATTERS:
        if hasattr(dist, name):
            original = getattr(dist, name)
            setattr(dist, name, lambda *a, _original=original, _name=name, **k: (calls.append(_name), _original(*a, **k))[1])
    world = World(rank=dist.get_rank(), size=dist.get_world_size())
    x = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(world.rank))
    counts: dict[str, list[list[str]]] = {}
    for parallel in ("ddp", "fsdp"):
        torch.manual_seed(0)
        step = wrap(Transformer(preset("tiny", vocab_size=64)), lambda m, b: lm_loss(m(b["x"]), b["x"]), parallel, world,
                    torch.device("cpu"))
        if parallel == "ddp":
            def counting_hook(state, bucket):  # DDP's reducer calls the process group itself, not `dist`
                calls.append("ddp_bucket_all_reduce")
                buffer = bucket.buffer().div_(world.size)
                return dist.all_reduce(buffer, async_op=True).get_future().then(lambda f: f.value()[0])
            step.register_comm_hook(None, counting_hook)
        per_micro = []
        for i in range(3):
            calls.clear()
            with grad_sync(step, i == 2):
                step({"x": x}).backward()
            per_micro.append(list(calls))
        counts[parallel] = per_micro
    if world.main:
        print(json.dumps(counts), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
