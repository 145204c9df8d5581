"""Training throughput of lmforge's model on random tokens: one JSON line per measurement.

    python bench/train_throughput.py --preset gpt2-124m --steps 50 [--compile] [--compare-hf]
        [--optim adamw|muon] [--chunked-loss N] [--batch-size B] [--seq-len T] [--device cpu]
        [--data PREPARED_DIR] [--loss-check]

Each line holds tokens/s, ms per step, a step-time breakdown (data, forward+backward, optimizer;
measured on separate steps with a device sync between the phases), MFU and peak memory (CUDA
only) and the loss of the first and last step. MFU counts 6N + 12 L H Q T FLOPs per token (N
without position embeddings) against --peak-tflops (H100 SXM bf16 dense: 989.5).

--compare-hf builds transformers' model of the same shape (GPT2LMHeadModel or LlamaForCausalLM,
from `lmforge.interop.hf.config_to_hf`), runs the same loop in the same process with torch's
AdamW (fused on CUDA) and prints a last line with the ratio of the two rates.

Batches are random tokens, or windows of prepared shards with --data. --loss-check trains a second,
plain copy (eager, full logits, same init, batches and dtype) for the same steps and reports the
relative difference of the mean training loss: the fast path (compile, chunked loss) must agree.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Callable

import torch
from torch import nn

from lmforge.config import TrainConfig, preset
from lmforge.model import Transformer
from lmforge.model.losses import chunked_lm_loss, lm_loss
from lmforge.train.optim import build_optimizer
from lmforge.utils.device import autocast, autocast_dtype, resolve_device
from lmforge.utils.errors import UserError


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="demo")
    p.add_argument("--vocab-size", type=int, default=50257)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--steps", type=int, default=20, help="timed steps (after --warmup untimed ones)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    p.add_argument("--compile", action="store_true")
    p.add_argument("--optim", default="adamw", choices=["adamw", "muon"])
    p.add_argument("--chunked-loss", type=int, default=0, help="tokens per chunk of the chunked cross-entropy; 0: plain")
    p.add_argument("--compare-hf", action="store_true")
    p.add_argument("--data", default=None, help="prepared shards to draw batches from (default: random tokens)")
    p.add_argument("--loss-check", action="store_true", help="also run the eager plain path and compare losses")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--peak-tflops", type=float, default=989.5, help="bf16 dense peak (H100 SXM: 989.5)")
    args = p.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    amp = autocast_dtype(device, args.dtype)
    if args.data:
        from lmforge.data import load_meta, open_split
        from lmforge.data.loader import TokenWindows

        args.vocab_size = load_meta(args.data)["vocab_size"]
    cfg = preset(args.preset, vocab_size=args.vocab_size)
    T = args.seq_len or cfg.context_length
    train = TrainConfig(optim=args.optim, lr=6e-4, chunked_loss=args.chunked_loss)
    if args.data:
        windows = TokenWindows(open_split(args.data, "train"), T, "train")

        def batch(i: int) -> torch.Tensor:
            x, y = windows.random_batch(args.batch_size, 0, i)
            return torch.cat([x, y[:, -1:]], dim=1).to(device, non_blocking=True)
    else:
        # A pool of random tokens on the host; each step copies one batch of it to the device (the "data" phase).
        g = torch.Generator().manual_seed(0)
        pool = torch.randint(0, args.vocab_size, (max(4, args.batch_size) * 8, T + 1), generator=g)
        pool = pool.pin_memory() if device.type == "cuda" else pool

        def batch(i: int) -> torch.Tensor:
            rows = torch.arange(i * args.batch_size, (i + 1) * args.batch_size) % pool.size(0)
            return pool[rows].to(device, non_blocking=True)
    common = dict(preset=args.preset, device=str(device), dtype=str(amp or torch.float32).replace("torch.", ""),
                  compile=args.compile, threads=torch.get_num_threads(), batch_size=args.batch_size, seq_len=T)

    torch.manual_seed(0)
    model = Transformer(cfg).to(device)
    fwd = torch.compile(model) if args.compile else model
    if args.chunked_loss:
        loss_fn = lambda x, y: chunked_lm_loss(fwd(x, return_hidden=True), model.output.weight, y, args.chunked_loss)  # noqa: E731
    else:
        loss_fn = lambda x, y: lm_loss(fwd(x), y)  # noqa: E731
    opt = build_optimizer(model, train, device)
    ours, fast_losses = measure(model, loss_fn, opt, batch, args, device, amp, T)
    line = {"what": "train_throughput", "impl": "lmforge", **common, "optim": args.optim,
            "chunked_loss": args.chunked_loss, "params": model.num_params(), **ours}
    del model, fwd, opt
    if args.loss_check:
        torch.manual_seed(0)
        plain = Transformer(cfg).to(device)
        _, eager_losses = measure(plain, lambda x, y: lm_loss(plain(x), y), build_optimizer(plain, train, device),
                                  batch, args, device, amp, T)
        fast, eager = sum(fast_losses) / len(fast_losses), sum(eager_losses) / len(eager_losses)
        line["loss_vs_eager"] = {"steps": len(fast_losses), "mean_loss": round(fast, 5), "eager_mean_loss": round(eager, 5),
                                 "rel_diff": round(abs(fast - eager) / eager, 6)}
        del plain
    print(json.dumps(line), flush=True)
    if not args.compare_hf:
        return

    import transformers

    from lmforge.interop.hf import config_to_hf

    try:
        hf_cfg = {**config_to_hf(cfg), "bos_token_id": 0, "eos_token_id": 0}  # no tokenizer here: any in-vocabulary id
    except UserError as e:
        print(json.dumps({"what": "train_throughput_ratio", "preset": args.preset, "skipped": str(e)}))
        return
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(**{k: v for k, v in hf_cfg.items() if k != "architectures"})
    hf = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").to(device)
    hf_fwd = torch.compile(hf) if args.compile else hf
    hf_opt = torch.optim.AdamW(hf.parameters(), lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=device.type == "cuda")
    theirs, _ = measure(hf, lambda x, y: lm_loss(hf_fwd(input_ids=x).logits, y), hf_opt, batch, args, device, amp, T)
    print(json.dumps({"what": "train_throughput", "impl": "transformers", "model": hf_cfg["architectures"][0], **common,
                      "optim": "adamw", "chunked_loss": 0, "params": _params(hf), **theirs}))
    print(json.dumps({"what": "train_throughput_ratio", "preset": args.preset, "device": str(device),
                      "lmforge_over_transformers": round(ours["tokens_per_s"] / theirs["tokens_per_s"], 3)}))


def measure(model: nn.Module, loss_fn: Callable, opt, batch: Callable, args, device: torch.device,
            amp: torch.dtype | None, T: int) -> tuple[dict, list[float]]:
    """Timings of `args.steps` steps after `args.warmup`, then the breakdown on up to 10 more; and every step's loss."""
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    B = args.batch_size
    losses: list[torch.Tensor] = []

    def step(i: int, timings: dict | None = None) -> None:
        t0 = time.perf_counter()
        xy = batch(i)
        if timings is not None:
            sync()
            t1 = time.perf_counter()
        with autocast(device, amp):
            loss = loss_fn(xy[:, :-1], xy[:, 1:])
        loss.backward()
        if timings is not None:
            sync()
            t2 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())
        if timings is not None:
            sync()
            t3 = time.perf_counter()
            for k, v in (("data", t1 - t0), ("forward_backward", t2 - t1), ("optimizer", t3 - t2)):
                timings[k] = timings.get(k, 0.0) + v

    model.train()
    for i in range(args.warmup):
        step(i)
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for i in range(args.steps):
        step(args.warmup + i)
    sync()
    seconds = (time.perf_counter() - t0) / args.steps
    all_losses = [t.item() for t in losses]
    timings: dict[str, float] = {}
    n_breakdown = max(1, min(args.steps, 10))
    for i in range(n_breakdown):
        step(args.warmup + args.steps + i, timings)
    tokens_per_s = B * T / seconds
    flops = _flops_per_token(model, T)
    return {
        "tokens_per_s": round(tokens_per_s, 1),
        "ms_per_step": round(seconds * 1e3, 2),
        "breakdown_ms": {k: round(v / n_breakdown * 1e3, 2) for k, v in timings.items()},
        "mfu": round(tokens_per_s * flops / (args.peak_tflops * 1e12), 4) if cuda else None,
        "peak_memory_gb": round(torch.cuda.max_memory_allocated() / 2**30, 3) if cuda else None,
        "loss_first": round(all_losses[0], 4), "loss_last": round(all_losses[-1], 4),
    }, all_losses


def _params(model: nn.Module) -> int:
    """Parameters without position embeddings (tied weights once), for lmforge's and transformers' models."""
    if isinstance(model, Transformer):
        return model.num_params()
    n = sum(p.numel() for p in model.parameters())
    wpe = getattr(getattr(model, "transformer", None), "wpe", None)
    return n - (wpe.weight.numel() if wpe is not None else 0)


def _flops_per_token(model: nn.Module, T: int) -> int:
    """6N + 12 L H Q T (Kaplan et al. 2020; PaLM appendix B), N without position embeddings."""
    c = model.config
    if isinstance(model, Transformer):
        L, HQ = c.n_layer, c.n_head * c.head_size
    else:
        L, HQ = c.num_hidden_layers, c.hidden_size
    return 6 * _params(model) + 12 * L * HQ * T


if __name__ == "__main__":
    main()
