"""Time of one sampling call for a batch of next-token logits: lmforge's `sample_rows` against the
textbook way (a full sort for top-k/top-p/min-p, then `torch.multinomial`), in the same process.

    python bench/sampling.py [--batch 32] [--vocab 50257] [--checkpoint CKPT] [--device cpu] [--repeat 20]

Logits are random (N(0, 1) times 3) or, with --checkpoint, the model's own next-token logits
over the first positions of tinyshakespeare (real distributions: peaked after a few tokens, flat
at the start). One JSON line per setting: {"what", "setting", "batch", "vocab", "device", "ms",
"reference_ms", "speedup", "same_kept_tokens"}; the last says whether both keep the same tokens.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from lmforge.infer.sampling import SamplingParams, _filter_sorted, _top_k, filter_logits, sample_rows
from lmforge.utils.device import resolve_device
from _data import print_row  # bench/_data.py
from _stop import entry_point  # bench/_stop.py

SETTINGS = {
    "temperature 0.7": SamplingParams(temperature=0.7),
    "top_p 0.9": SamplingParams(temperature=0.7, top_p=0.9),
    "top_k 50 + top_p 0.9 (lmforge chat)": SamplingParams(temperature=0.7, top_k=50, top_p=0.9),
    "top_p 0.95, temperature 1": SamplingParams(temperature=1.0, top_p=0.95),
    "min_p 0.05": SamplingParams(temperature=1.0, min_p=0.05),
}


def columns(x: torch.Tensor, p: SamplingParams) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """top_k, top_p and min_p of `p` for every row of `x`, as `filter_logits` takes them."""
    full = lambda v, dtype=torch.float32: torch.full((x.size(0),), v, dtype=dtype, device=x.device)
    return full(p.top_k, torch.long), full(p.top_p), full(p.min_p)


def sorted_filter(x: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """The filters through a full sort of every row."""
    top_k, top_p, min_p = columns(x, p)
    return _filter_sorted(x, _top_k(top_k, x.size(-1)), top_p, min_p)


def reference(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Full sort for the filters, then one multinomial draw per row (as transformers samples)."""
    x = logits.float() / p.temperature
    if p.filtered:
        x = sorted_filter(x, p)
    return torch.multinomial(torch.softmax(x, dim=-1), 1)[:, 0]


def kept(logits: torch.Tensor, p: SamplingParams, fast: bool) -> torch.Tensor:
    """Which tokens the filters keep: lmforge's way (`fast`) or through the full sort."""
    x = logits.float() / p.temperature
    return (filter_logits(x, *columns(x, p)) if fast else sorted_filter(x, p)) > float("-inf")


def timed(fn, device: torch.device, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


@entry_point
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--vocab", type=int, default=50257)
    p.add_argument("--checkpoint", default=None, help="take real next-token logits from this model")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeat", type=int, default=20)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    torch.manual_seed(0)
    if args.checkpoint:
        from lmforge.checkpoint import load_model

        model, ckpt = load_model(args.checkpoint)
        text = (Path(__file__).resolve().parents[1] / "src/lmforge/assets/tinyshakespeare.txt").read_text()[:20_000]
        ids = ckpt.tokenizer.encode(text)[: args.batch]
        with torch.no_grad():
            logits = model(torch.tensor([ids]))[0, :, : model.config.vocab_size].float()
    else:
        logits = torch.randn(args.batch, args.vocab) * 3
    logits = logits.to(device)
    B, V = logits.shape
    for name, sp in SETTINGS.items():
        ours = timed(lambda: sample_rows(logits, [sp] * B, [None] * B).tokens, device, args.repeat)
        theirs = timed(lambda: reference(logits, sp), device, args.repeat)
        same = bool(torch.equal(kept(logits, sp, True), kept(logits, sp, False))) if sp.filtered else None
        print_row({"what": "sampling", "setting": name, "batch": B, "vocab": V, "device": str(device),
                   "logits": "checkpoint" if args.checkpoint else "random", "ms": round(ours, 3),
                   "reference_ms": round(theirs, 3), "speedup": round(theirs / ours, 2), "same_kept_tokens": same})


if __name__ == "__main__":
    main()
