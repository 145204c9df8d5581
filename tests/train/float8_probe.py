"""Run under `torchrun --nproc-per-node 2`: FSDP2 over the float8 layers of `train.fp8`, with the
weights all-gathered as they are (fp32) and then in float8 (`to_float8(..., sharded=True)`). For
each, the bytes one forward all-gathers and the losses of two steps; rank 0 prints one JSON line."""

import json

import torch
import torch.distributed as dist

from lmforge.config import preset
from lmforge.model import Transformer
from lmforge.model.losses import lm_loss
from lmforge.train.distributed import World, wrap
from lmforge.train.float8 import refresh_float8_scales, to_float8


def main() -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    gathered = [0]
    for name in ("all_gather_into_tensor", "all_gather_single"):  # FSDP2 calls the second from torch 2.12
        if hasattr(dist, name):
            original = getattr(dist, name)

            def counting(output, *a, _original=original, **k):
                gathered[0] += output.numel() * output.element_size()
                return _original(output, *a, **k)
            setattr(dist, name, counting)
    world = World(rank=dist.get_rank(), size=dist.get_world_size())
    x = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(world.rank))
    result = {}
    for sharded in (False, True):
        torch.manual_seed(0)
        net = Transformer(preset("tiny", vocab_size=64))
        to_float8(net, torch.device("cpu"), sharded=sharded)
        step = wrap(net, lambda m, b: lm_loss(m(b["x"]), b["x"]), "fsdp", world, torch.device("cpu"))
        optimizer = torch.optim.AdamW(net.parameters(), lr=1e-2)
        losses = []
        for i in range(2):
            gathered[0] = 0
            loss = step({"x": x})
            if i == 0:
                forward_bytes = gathered[0]
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            if sharded:
                refresh_float8_scales(net)
            losses.append(loss.item())
        result["float8" if sharded else "plain"] = {"forward_bytes": forward_bytes, "losses": losses}
    if world.main:
        print(json.dumps(result), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
