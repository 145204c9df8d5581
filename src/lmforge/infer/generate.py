"""Autoregressive generation as small functions: sample, prefill, decode_one_token, generate.

The KV cache is created here and passed to the model; `use_cache=False` recomputes the whole
sequence every step (the reference the cached path is tested against).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from lmforge.config.model import check_scalar_types
from lmforge.infer.sampling import draw, filter_logits, is_greedy
from lmforge.model import KVCache, Transformer
from lmforge.utils.errors import UserError


@dataclass
class SamplingConfig:
    """How the next token is picked. temperature 0 (below 1e-5) is greedy; top_k 0 and top_p 1 disable them."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        check_scalar_types(type(self), vars(self), "sampling")  # temperature=None or top_k=5.5 from Python
        if not self.temperature >= 0:  # NaN too
            raise UserError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise UserError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise UserError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.seed is not None and not 0 <= self.seed < 2**64:
            raise UserError(f"seed must be in [0, 2**64), got {self.seed}")
        self.top_k = min(self.top_k, 2**31 - 1)  # any k past the vocabulary keeps all; a huge one must fit int64


def sample(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids (B,) from last-position logits (B, V)."""
    if is_greedy(cfg.temperature):  # the Engine's rule: a tiny temperature overflows the scaled logits
        return logits.argmax(dim=-1)
    logits = logits.float() / cfg.temperature
    if cfg.top_k or cfg.top_p < 1.0:
        full = lambda value, dtype: torch.full((logits.size(0),), value, dtype=dtype, device=logits.device)
        logits = filter_logits(logits, full(cfg.top_k, torch.long), full(cfg.top_p, torch.float32), full(0.0, torch.float32))
    return draw(logits, [generator] * logits.size(0))


def prefill(model: Transformer, idx: torch.Tensor, cache: KVCache | None, **memory) -> torch.Tensor:
    """Run the prompt (B, T) through the model, filling the cache; last-position logits (B, V).

    `memory` holds an encoder-decoder's `memory` and `memory_mask` (see `Transformer.encode_source`).
    """
    return model(idx, cache=cache, start=0, **memory)[:, -1, : model.config.vocab_size]


def decode_one_token(model: Transformer, token: torch.Tensor, cache: KVCache, pos: int, **memory) -> torch.Tensor:
    """Logits (B, V) for one new token per sequence (B,) at position `pos`."""
    return model(token[:, None], cache=cache, start=pos, **memory)[:, -1, : model.config.vocab_size]


@torch.inference_mode()
def generate_tokens(
    model: Transformer,
    prompt: list[int] | torch.Tensor,
    max_new_tokens: int,
    sampling: SamplingConfig | None = None,
    stop_tokens: tuple[int, ...] = (),
    use_cache: bool = True,
    memory: torch.Tensor | None = None,
    memory_mask: torch.Tensor | None = None,
) -> Iterator[int]:
    """Yield new token ids one at a time (batch 1) until max_new_tokens or a stop token.

    Past the context length the window slides: each token is predicted from the last
    `context_length` tokens. An encoder-decoder also takes the encoded source as `memory`.
    """
    if model.config.arch == "encoder":
        raise UserError("an encoder model cannot generate text; use a decoder (GPT, Llama) checkpoint")
    sampling = sampling or SamplingConfig()
    idx = torch.as_tensor(prompt, dtype=torch.long, device=model.tok_embeddings.weight.device).view(1, -1)
    T, ctx = idx.size(1), model.config.context_length
    if T == 0:
        raise UserError("the prompt is empty; give at least one token of text")
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
        raise UserError(f"max_new_tokens must be a whole number >= 0, got {max_new_tokens!r}")
    if T > ctx:
        raise UserError(f"the prompt is {T} tokens, longer than the model's context of {ctx}; shorten the prompt")
    generator = None
    if sampling.seed is not None:
        generator = torch.Generator(device=idx.device).manual_seed(sampling.seed)
    enc = {"memory": memory, "memory_mask": memory_mask} if memory is not None else {}
    cache = model.new_cache(batch_size=1, max_seq_len=ctx) if use_cache else None
    logits = prefill(model, idx, cache, **enc)
    for i in range(max_new_tokens):
        token = sample(logits, sampling, generator)
        tid = int(token.item())
        yield tid
        if tid in stop_tokens or i == max_new_tokens - 1:
            return
        idx = torch.cat([idx, token[:, None]], dim=1)
        if use_cache and idx.size(1) <= ctx:
            logits = decode_one_token(model, token, cache, idx.size(1) - 1, **enc)
        else:
            # Without a cache, or once the context is full: recompute over the last `ctx` tokens
            # (nanoGPT's sliding window; absolute positions make cached keys stale after a shift).
            logits = prefill(model, idx[:, -ctx:], None, **enc)
