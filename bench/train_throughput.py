"""Training throughput of lmforge's model on random tokens: one JSON line per measurement.

    python bench/train_throughput.py --preset demo --batch-size 32 --steps 20 [--device cpu] [--compile]

Prints {"what", "preset", "device", "dtype", "batch_size", "seq_len", "params", "tokens_per_s",
"ms_per_step", "mfu", "peak_memory_gb"}; MFU only on CUDA (bf16 dense peak of the GPU, --peak-tflops).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from lmforge.config import preset
from lmforge.model import Transformer
from lmforge.model.losses import lm_loss
from lmforge.utils.device import autocast, autocast_dtype, resolve_device


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="demo")
    p.add_argument("--vocab-size", type=int, default=50257)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="auto")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--peak-tflops", type=float, default=989.5, help="bf16 dense peak (H100 SXM: 989.5)")
    args = p.parse_args()

    device = resolve_device(args.device)
    amp = autocast_dtype(device, "auto")
    cfg = preset(args.preset, vocab_size=args.vocab_size)
    T = args.seq_len or cfg.context_length
    torch.manual_seed(0)
    model = Transformer(cfg).to(device)
    step_fn = torch.compile(model) if args.compile else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    x = torch.randint(0, args.vocab_size, (args.batch_size, T + 1), device=device)

    def step() -> None:
        with autocast(device, amp):
            loss = lm_loss(step_fn(x[:, :-1]), x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - t0) / args.steps
    tokens_per_s = args.batch_size * T / seconds
    mfu = tokens_per_s * model.flops_per_token(T) / (args.peak_tflops * 1e12) if device.type == "cuda" else None
    print(json.dumps({
        "what": "train_throughput", "preset": args.preset, "device": str(device),
        "dtype": str(amp or torch.float32).replace("torch.", ""), "compile": args.compile,
        "threads": torch.get_num_threads(), "batch_size": args.batch_size, "seq_len": T,
        "params": model.num_params(), "tokens_per_s": round(tokens_per_s, 1), "ms_per_step": round(seconds * 1e3, 2),
        "mfu": mfu and round(mfu, 4),
        "peak_memory_gb": round(torch.cuda.max_memory_allocated() / 2**30, 3) if device.type == "cuda" else None,
    }))


if __name__ == "__main__":
    main()
