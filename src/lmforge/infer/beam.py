"""Beam search with a length penalty, for decoder-only and encoder-decoder models.

The beams are the rows of one KV cache; after each step `KVCache.reorder` moves every beam's
keys and values to the row of the beam that continues it. A hypothesis ends at `eos_id` (an id, or several); its
score is its summed log-probability divided by length ** length_penalty (Wu et al. 2016, as
transformers does it): above 0 favours longer outputs, 0 ranks by plain log-probability.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass

import torch

from lmforge.model import Transformer
from lmforge.utils.errors import UserError


@dataclass
class Hypothesis:
    tokens: list[int]  # generated tokens (the end-of-sequence token included when it ended one)
    logprob: float  # summed log-probability of `tokens`
    score: float  # logprob / len(tokens) ** length_penalty


def beam_search(
    model: Transformer,
    prompt: list[int],
    beam_size: int = 4,
    max_new_tokens: int = 32,
    length_penalty: float = 1.0,
    eos_id: int | Collection[int] | None = None,
    memory: torch.Tensor | None = None,
    memory_mask: torch.Tensor | None = None,
) -> list[Hypothesis]:
    """The `beam_size` best continuations of `prompt`, best first.

    An encoder-decoder passes `memory` (1, S, C) from `encode_source` and a prompt of the
    decoder start token. Search stops after `max_new_tokens`, or once `beam_size` hypotheses have
    ended and no live beam can still beat the worst of them.
    """
    return beam_search_batch(model, [prompt], beam_size, max_new_tokens, length_penalty, eos_id, memory, memory_mask)[0]


@torch.inference_mode()
def beam_search_batch(
    model: Transformer,
    prompts: list[list[int]],
    beam_size: int = 4,
    max_new_tokens: int = 32,
    length_penalty: float = 1.0,
    eos_id: int | Collection[int] | None = None,
    memory: torch.Tensor | None = None,
    memory_mask: torch.Tensor | None = None,
) -> list[list[Hypothesis]]:
    """`beam_search` for several prompts of one length at once: one forward per step for all.

    The prompts' K beams are rows [b*K, (b+1)*K) of one cache. This is how an encoder-decoder
    translates a batch: every prompt is the decoder start token, and `memory` (B, S, C) with
    `memory_mask` (B, S) holds the padded sources. A prompt's search ends as `beam_search`'s
    does; its rows then idle until every prompt has ended.
    """
    if model.config.arch == "encoder":
        raise UserError("an encoder model cannot generate text; use a decoder or encoder-decoder checkpoint")
    if beam_size < 1 or max_new_tokens < 1:
        raise UserError(f"beam_size and max_new_tokens must be >= 1, got {beam_size} and {max_new_tokens}")
    T, ctx = len(prompts[0]), model.config.context_length
    if any(len(p) != T for p in prompts):
        raise ValueError("beam_search_batch takes prompts of one length")
    if T == 0 or T + max_new_tokens > ctx:
        raise UserError(f"the prompt ({T} tokens) plus max_new_tokens ({max_new_tokens}) must fit the context of {ctx}")
    device = model.tok_embeddings.weight.device
    V, K, B = model.config.vocab_size, beam_size, len(prompts)
    ends = {eos_id} if isinstance(eos_id, int) else set(eos_id or ())  # several, as transformers takes a list
    idle = min(ends, default=0)  # the token fed to rows with nothing left to search
    enc = {}
    if memory is not None:
        enc = {"memory": memory.repeat_interleave(K, dim=0)}
        if memory_mask is not None:
            enc["memory_mask"] = memory_mask.repeat_interleave(K, dim=0)
    cache = model.new_cache(B * K, T + max_new_tokens)
    ids = torch.tensor(prompts, device=device).repeat_interleave(K, dim=0)
    logits = model(ids, cache=cache, start=0, **enc)[:, -1, :V]
    # Summed log-probabilities per row; a prompt starts with one live beam (its copies at -inf).
    scores = torch.full((B, K), -math.inf, device=device)
    scores[:, 0] = 0.0
    beams: list[list[list[int]]] = [[[] for _ in range(K)] for _ in range(B)]
    done: list[list[Hypothesis]] = [[] for _ in range(B)]
    live = [True] * B
    for step in range(max_new_tokens):
        cand = (scores.view(-1, 1) + torch.log_softmax(logits.float(), dim=-1)).view(B, K * V)
        top_scores, top_idx = (t.tolist() for t in cand.topk(min(2 * K, K * V), dim=-1))
        index = torch.arange(B * K).view(B, K).tolist()  # rows keep their keys unless reordered
        tokens = [[idle] * K for _ in range(B)]
        next_scores = [[-math.inf] * K for _ in range(B)]
        for b in range(B):
            if not live[b]:
                continue
            kept: list[tuple[list[int], float, int]] = []
            for rank, (s, i) in enumerate(zip(top_scores[b], top_idx[b])):
                if s == -math.inf:
                    break
                j, tok = divmod(i, V)
                hyp = beams[b][j] + [tok]
                if tok in ends:
                    # Only an end ranked within the top K finishes a hypothesis; the K after it are
                    # there to refill the live beams (transformers' `top_num_beam_mask`).
                    if rank < K:
                        done[b].append(Hypothesis(hyp, s, s / len(hyp) ** length_penalty))
                    continue
                kept.append((hyp, s, j))
                if len(kept) == K:
                    break
            done[b] = sorted(done[b], key=lambda h: -h.score)[:K]
            length = step + 1
            if len(done[b]) == K and kept and max(s for _, s, _ in kept) / length ** length_penalty <= done[b][-1].score:
                live[b] = False
                continue
            if step == max_new_tokens - 1 or not kept:
                done[b] += [Hypothesis(t, s, s / len(t) ** length_penalty) for t, s, _ in kept]
                live[b] = False
                continue
            for n, (hyp, s, j) in enumerate(kept):  # rows past len(kept) keep their keys and a -inf score
                beams[b][n], next_scores[b][n], index[b][n], tokens[b][n] = hyp, s, b * K + j, hyp[-1]
        if not any(live):
            break
        scores = torch.tensor(next_scores, device=device)
        cache.reorder(torch.tensor(index, device=device).view(-1))
        step_ids = torch.tensor(tokens, device=device).view(-1, 1)
        logits = model(step_ids, cache=cache, start=T + step, **enc)[:, -1, :V]
    return [sorted(d, key=lambda h: -h.score)[:K] for d in done]
