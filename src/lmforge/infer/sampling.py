"""Next-token choice for a batch whose rows each carry their own options.

Per row, in this order (vLLM's and transformers' order):

    raw logits ─> repetition penalty (prompt + output tokens) ─> presence / frequency penalties
      (output tokens, OpenAI's formula) ─> greedy: argmax
                                        ─> else: / temperature ─> top-k ─> top-p ─> min-p ─> draw

Each draw uses the row's own `torch.Generator` when it has a seed, so a seeded request gives the
same tokens alone or in any batch. Log-probabilities are those of the raw model distribution
(before penalties and temperature), as vLLM reports them by default.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmforge.utils.errors import UserError


GREEDY_BELOW = 1e-5


@dataclass
class SamplingParams:
    """One request's decoding options; the names and defaults are OpenAI's where it has them.

    temperature 0 (below 1e-5) is greedy; top_k 0, top_p 1, min_p 0 and penalties 1 / 0 / 0 disable those.
    `stop` strings end the text before they occur; `stop_token_ids` (and the tokenizer's
    end-of-text unless `ignore_eos`) end it after the token. `logprobs` k >= 0 reports the chosen
    token's log-probability and the k most likely ones; None reports none.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    seed: int | None = None
    logprobs: int | None = None

    def __post_init__(self) -> None:
        checks = [
            (self.max_tokens >= 1, f"max_tokens must be >= 1, got {self.max_tokens}"),
            (self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}"),
            (self.top_k >= 0, f"top_k must be >= 0, got {self.top_k}"),
            (0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p}"),
            (0.0 <= self.min_p <= 1.0, f"min_p must be in [0, 1], got {self.min_p}"),
            (0.01 <= self.repetition_penalty <= 100, f"repetition_penalty must be in [0.01, 100], got {self.repetition_penalty}"),
            (-2.0 <= self.presence_penalty <= 2.0, f"presence_penalty must be in [-2, 2], got {self.presence_penalty}"),
            (-2.0 <= self.frequency_penalty <= 2.0, f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}"),
            (self.logprobs is None or 0 <= self.logprobs <= 20, f"logprobs must be in [0, 20], got {self.logprobs}"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)
        # Any top_k at or above the vocabulary keeps every token; cap it so that a huge one (an
        # HTTP client may send 2**70) still fits the int64 tensor the sampler builds.
        self.top_k = min(self.top_k, 2**31 - 1)
        self.stop = tuple(s for s in self.stop if s)
        self.stop_token_ids = tuple(self.stop_token_ids)

    @property
    def greedy(self) -> bool:
        # Below 1e-5 the scaled logits overflow; the draw is the argmax anyway (vLLM's threshold).
        return self.temperature < GREEDY_BELOW

    @property
    def penalised(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @property
    def filtered(self) -> bool:
        return self.top_k > 0 or self.top_p < 1.0 or self.min_p > 0.0


def apply_penalties(
    logits: torch.Tensor,
    counts: torch.Tensor,
    prompt_mask: torch.Tensor,
    repetition: torch.Tensor,
    presence: torch.Tensor,
    frequency: torch.Tensor,
) -> torch.Tensor:
    """Penalised logits (B, V).

    `counts` (B, V): how often each token was generated so far; `prompt_mask` (B, V): which tokens
    occur in the prompt. Repetition penalty (Keskar et al. 2019, CTRL) divides positive logits and
    multiplies negative ones of every token seen in prompt or output; presence and frequency
    penalties (OpenAI) subtract `presence * [count > 0] + frequency * count` over output tokens.
    """
    seen = prompt_mask | (counts > 0)
    rep = repetition[:, None]
    logits = torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep), logits)
    return logits - frequency[:, None] * counts - presence[:, None] * (counts > 0).to(logits.dtype)


def filter_logits(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Temperature-scaled logits (B, V) with the tokens outside top-k, top-p and min-p set to -inf.

    top_k (B,) 0 keeps all; tokens tied with the k-th stay. top-p drops a token when the tokens
    ranked above it already hold top_p of the (top-k renormalised) mass, so the first always stays
    (Holtzman et al. 2019). min-p drops tokens below min_p times the most likely one (Nguyen et al. 2024).
    """
    V = logits.size(-1)
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    k = torch.where(top_k > 0, top_k.clamp(max=V), torch.full_like(top_k, V))
    drop = sorted_logits < sorted_logits.gather(1, (k - 1)[:, None])
    probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
    drop |= probs.cumsum(dim=-1) - probs > top_p[:, None]
    drop |= probs < min_p[:, None] * probs[:, :1]
    return logits.masked_fill(torch.zeros_like(drop).scatter(1, order, drop), float("-inf"))


@dataclass
class Choice:
    """What `sample_rows` picked: token ids (B,), and when asked, the chosen tokens' raw
    log-probabilities (B,) and the top ones (B, k) with their ids."""

    tokens: torch.Tensor
    logprobs: torch.Tensor | None = None
    top_logprobs: torch.Tensor | None = None
    top_ids: torch.Tensor | None = None


def sample_rows(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
    counts: torch.Tensor | None = None,
    prompt_mask: torch.Tensor | None = None,
) -> Choice:
    """Next tokens for last-position logits (B, V), row b under `params[b]` and `generators[b]`.

    `counts` and `prompt_mask` (B, V) are needed only when some row uses a penalty. Work that no
    row asks for (penalties, filters, log-probabilities, draws) is skipped.
    """
    raw = logits.float()
    dev = raw.device
    col = lambda name, dtype=torch.float32: torch.tensor([getattr(p, name) for p in params], dtype=dtype, device=dev)
    x = raw
    if any(p.penalised for p in params):
        if counts is None or prompt_mask is None:
            raise ValueError("penalties need the generated-token counts and the prompt mask")
        x = apply_penalties(x, counts.to(x.dtype), prompt_mask, col("repetition_penalty"), col("presence_penalty"),
                            col("frequency_penalty"))
    tokens = x.argmax(dim=-1)
    sampled = [b for b, p in enumerate(params) if not p.greedy]
    if sampled:
        temperature = torch.tensor([1.0 if p.greedy else p.temperature for p in params], device=dev)
        # Extreme penalties or temperatures can overflow: +inf becomes the largest float, NaN is dropped.
        x = (x / temperature[:, None]).nan_to_num(nan=float("-inf"), posinf=torch.finfo(x.dtype).max)
        if any(params[b].filtered for b in sampled):
            x = filter_logits(x, col("top_k", torch.long), col("top_p"), col("min_p"))
        probs = torch.softmax(x, dim=-1)
        for b in sampled:
            tokens[b] = torch.multinomial(probs[b], 1, generator=generators[b])[0]
    choice = Choice(tokens)
    want = [p.logprobs for p in params if p.logprobs is not None]
    if want:
        logp = torch.log_softmax(raw, dim=-1)
        choice.logprobs = logp.gather(1, tokens[:, None])[:, 0]
        if max(want) > 0:
            choice.top_logprobs, choice.top_ids = logp.topk(max(want), dim=-1)
    return choice
