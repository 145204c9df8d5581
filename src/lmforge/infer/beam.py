"""Beam search with a length penalty, for decoder-only and encoder-decoder models.

The beams are the rows of one KV cache; after each step `KVCache.reorder` moves every beam's
keys and values to the row of the beam that continues it. A hypothesis ends at `eos_id`; its
score is its summed log-probability divided by length ** length_penalty (Wu et al. 2016, as
transformers does it): above 0 favours longer outputs, 0 ranks by plain log-probability.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmforge.model import Transformer
from lmforge.utils.errors import UserError


@dataclass
class Hypothesis:
    tokens: list[int]  # generated tokens (the end-of-sequence token included when it ended one)
    logprob: float  # summed log-probability of `tokens`
    score: float  # logprob / len(tokens) ** length_penalty


@torch.inference_mode()
def beam_search(
    model: Transformer,
    prompt: list[int],
    beam_size: int = 4,
    max_new_tokens: int = 32,
    length_penalty: float = 1.0,
    eos_id: int | None = None,
    memory: torch.Tensor | None = None,
    memory_mask: torch.Tensor | None = None,
) -> list[Hypothesis]:
    """The `beam_size` best continuations of `prompt`, best first.

    An encoder-decoder passes `memory` (1, S, C) from `encode_source` and a prompt of the
    decoder start token. Search stops after `max_new_tokens`, or once `beam_size` hypotheses have
    ended and no live beam can still beat the worst of them.
    """
    if model.config.arch == "encoder":
        raise UserError("an encoder model cannot generate text; use a decoder or encoder-decoder checkpoint")
    if beam_size < 1 or max_new_tokens < 1:
        raise UserError(f"beam_size and max_new_tokens must be >= 1, got {beam_size} and {max_new_tokens}")
    T, ctx = len(prompt), model.config.context_length
    if T == 0 or T + max_new_tokens > ctx:
        raise UserError(f"the prompt ({T} tokens) plus max_new_tokens ({max_new_tokens}) must fit the context of {ctx}")
    device = model.tok_embeddings.weight.device
    V, K = model.config.vocab_size, beam_size
    enc = {}
    if memory is not None:
        enc = {"memory": memory.expand(K, -1, -1)}
        if memory_mask is not None:
            enc["memory_mask"] = memory_mask.expand(K, -1)
    cache = model.new_cache(K, T + max_new_tokens)
    one = {k: v[:1] for k, v in enc.items()}
    logits = model(torch.tensor([prompt], device=device), cache=cache.rows(0, 1), start=0, **one)[:, -1, :V]
    cache.reorder(torch.zeros(K, dtype=torch.long, device=device))  # every beam starts from the prompt
    scores = torch.zeros(1, device=device)  # (beams,) summed log-probabilities
    beams: list[list[int]] = [[]]
    done: list[Hypothesis] = []
    for step in range(max_new_tokens):
        cand = (scores[:, None] + torch.log_softmax(logits.float(), dim=-1)).view(-1)  # (beams * V,)
        top_scores, top_idx = cand.topk(min(2 * K, cand.numel()))
        next_beams, next_scores, origin = [], [], []
        for s, i in zip(top_scores.tolist(), top_idx.tolist()):
            b, tok = divmod(i, V)
            tokens = beams[b] + [tok]
            if tok == eos_id:
                done.append(Hypothesis(tokens, s, s / len(tokens) ** length_penalty))
                continue
            next_beams.append(tokens)
            next_scores.append(s)
            origin.append(b)
            if len(next_beams) == K:
                break
        done.sort(key=lambda h: -h.score)
        done = done[:K]
        length = step + 1
        if len(done) == K and max(next_scores) / length ** length_penalty <= done[-1].score:
            break
        if step == max_new_tokens - 1 or not next_beams:
            done += [Hypothesis(t, s, s / len(t) ** length_penalty) for t, s in zip(next_beams, next_scores)]
            break
        beams, scores = next_beams, torch.tensor(next_scores, device=device)
        n = len(beams)
        index = torch.tensor(origin + [origin[-1]] * (K - n), device=device)
        cache.reorder(index)
        tokens = torch.tensor([t[-1] for t in beams] + [beams[-1][-1]] * (K - n), device=device)
        logits = model(tokens[:, None], cache=cache, start=T + step, **enc)[:n, -1, :V]
    return sorted(done, key=lambda h: -h.score)[:K]
