"""Next-token choice for a batch whose rows each carry their own options.

Per row, in this order (transformers' order; vLLM's current sampler applies min-p before top-k and top-p,
which keeps fewer tokens when min-p and top-p are both set):

    raw logits ─> logit bias ─> repetition penalty (prompt + output tokens) ─> presence / frequency
      penalties (output tokens, OpenAI's formula) ─> greedy: argmax
                                        ─> else: / temperature ─> top-k ─> top-p ─> min-p ─> draw

Each draw uses the row's own `torch.Generator` when it has a seed, so a seeded request draws the
same random numbers alone or in any batch, and from the same logits the same tokens. A batch's
matrix products may round a row's logits differently in the last bits, which now and then moves a
draw in the long tail to a neighbouring token (see README, Serving). Log-probabilities are those of the raw model distribution
(before penalties and temperature), as vLLM reports them by default.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmforge.utils.errors import UserError


GREEDY_BELOW = 1e-5


def is_greedy(temperature: float) -> bool:
    """Whether `temperature` picks the argmax. Below 1e-5 the scaled logits overflow; the draw is
    the argmax anyway (vLLM's threshold)."""
    return temperature < GREEDY_BELOW


@dataclass
class SamplingParams:
    """One request's decoding options; the names and defaults are OpenAI's where it has them.

    temperature 0 (below 1e-5) is greedy; top_k 0, top_p 1, min_p 0 and penalties 1 / 0 / 0 disable those.
    `stop` strings end the text before they occur; `stop_token_ids` (and the tokenizer's
    end-of-text unless `ignore_eos`) end it after the token; a bare string or id is one stop, as in
    vLLM. `logprobs` k >= 0 reports the chosen token's log-probability and the k most likely ones;
    None reports none. `prompt_logprobs` k >= 0 does the same for each prompt token after the first
    (vLLM's: the model's own log-probabilities, what an evaluation harness scores a text by);
    `max_tokens` 0 then scores the prompt without generating. `logit_bias` maps token
    ids to a number in [-100, 100] added to their logits (OpenAI's: -100 bans a token, 100 all but
    forces it). `skip_special_tokens` leaves special tokens (`<|im_start|>`) out of the text, as vLLM does
    by default; their ids stay in the output and the logprobs.
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
    prompt_logprobs: int | None = None
    logit_bias: dict[int, float] | None = None
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        checks = [
            (self.max_tokens >= 0, f"max_tokens must be >= 0, got {self.max_tokens}"),
            (self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}"),
            (self.top_k >= 0, f"top_k must be >= 0, got {self.top_k}"),
            (0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p}"),
            (0.0 <= self.min_p <= 1.0, f"min_p must be in [0, 1], got {self.min_p}"),
            (0.01 <= self.repetition_penalty <= 100, f"repetition_penalty must be in [0.01, 100], got {self.repetition_penalty}"),
            (-2.0 <= self.presence_penalty <= 2.0, f"presence_penalty must be in [-2, 2], got {self.presence_penalty}"),
            (-2.0 <= self.frequency_penalty <= 2.0, f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}"),
            (self.logprobs is None or 0 <= self.logprobs <= 20, f"logprobs must be in [0, 20], got {self.logprobs}"),
            (self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= 20,
             f"prompt_logprobs must be in [0, 20], got {self.prompt_logprobs}"),
            (self.seed is None or 0 <= self.seed < 2**64, f"seed must be in [0, 2**64), got {self.seed}"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)
        for token, bias in (self.logit_bias or {}).items():
            if not (isinstance(token, int) and token >= 0 and -100.0 <= bias <= 100.0):
                raise UserError(f"logit_bias maps token ids (>= 0) to numbers in [-100, 100], got {token!r}: {bias!r}")
        # Any top_k at or above the vocabulary keeps every token; cap it so that a huge one (an
        # HTTP client may send 2**70) still fits the int64 tensor the sampler builds.
        self.top_k = min(self.top_k, 2**31 - 1)
        # tuple("END") would be the stops "E", "N", "D": a bare string (or id) is one stop.
        self.stop = tuple(s for s in ((self.stop,) if isinstance(self.stop, str) else self.stop or ()) if s)
        self.stop_token_ids = tuple((self.stop_token_ids,) if isinstance(self.stop_token_ids, int) else self.stop_token_ids or ())

    @property
    def greedy(self) -> bool:
        return is_greedy(self.temperature)

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


CANDIDATES = 1024  # tokens ranked for a row without top-k; the nucleus of a trained model's next token fits


def filter_logits(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Temperature-scaled logits (B, V) with the tokens outside top-k, top-p and min-p set to -inf.

    top_k (B,) 0 keeps all; tokens tied with the k-th stay. top-p drops a token when the tokens
    ranked above it already hold top_p of the (top-k renormalised) mass, so the first always stays
    (Holtzman et al. 2019). min-p drops tokens below min_p times the most likely one (Nguyen et al. 2024).

    Each filter keeps a prefix of the tokens ranked by logit, so only the top k (or, without
    top-k, the top `CANDIDATES`) are ranked (`Ranked`). Sampling 32 rows of SmolLM2's logits with
    top_k 50 and top_p 0.9 took 4.4 ms so, against 175.6 through a full sort (`bench/sampling.py`,
    this project's CPU). A row whose prefix may reach past the ranked tokens (a flat
    distribution under top-p, ties at the k-th) is filtered through a full sort instead. The two
    normalise in float32 in other orders, so a token whose cumulative mass is within rounding of
    top_p may be kept by one and not the other (README, Serving, has the counts).
    """
    k = _top_k(top_k, logits.size(-1))
    return _kept(logits, k, top_p, min_p, Ranked.of(logits, k, top_p, min_p))


def _kept(logits: torch.Tensor, k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor, ranked: Ranked | None) -> torch.Tensor:
    """`filter_logits` from its ranked part (None: sort every row)."""
    if ranked is None:
        return _filter_sorted(logits, k, top_p, min_p)
    kept = torch.full_like(logits, float("-inf")).scatter(1, ranked.order, ranked.logits)
    kept = torch.where(ranked.unfiltered[:, None], logits, kept)
    rows = (~ranked.exact & ~ranked.unfiltered).nonzero()[:, 0]
    if len(rows):  # the full sort, for those rows only
        kept[rows] = _filter_sorted(logits[rows], k[rows], top_p[rows], min_p[rows])
    return kept


def _top_k(top_k: torch.Tensor, V: int) -> torch.Tensor:
    """top_k with 0 (keep all) and anything above V made V."""
    return torch.where(top_k > 0, top_k.clamp(max=V), torch.full_like(top_k, V))


@dataclass
class Ranked:
    """The filters applied to each row's top-m logits: `logits` (B, m), -inf where dropped, and
    their token ids `order` (B, m). `exact` marks the rows whose kept tokens all lie among those m;
    `unfiltered` the rows that keep every token (no filter asked)."""

    logits: torch.Tensor
    order: torch.Tensor
    exact: torch.Tensor
    unfiltered: torch.Tensor

    @staticmethod
    def of(logits: torch.Tensor, k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor) -> Ranked | None:
        """None when the rows need (nearly) every token ranked anyway: sort them."""
        V = logits.size(-1)
        limited = k < V
        # Rows that filter rank their top k, or without top-k the top CANDIDATES; rows that do not filter need none.
        want = torch.where(limited, k, torch.full_like(k, CANDIDATES))
        m = min(V, int(torch.where(limited | (top_p < 1.0) | (min_p > 0.0), want, torch.ones_like(k)).max()))
        if m >= V:
            return None
        vals, order = logits.topk(m, dim=-1)  # (B, m), descending
        kth = torch.where(limited, vals.gather(1, (k.clamp(max=m) - 1)[:, None])[:, 0], float("-inf"))[:, None]
        drop = vals < kth
        top = vals[:, :1]
        # Normalised over every token top-k keeps in the whole vocabulary: with top-k, the ranked ones
        # (a row with ties at the k-th past them is not exact, and is sorted instead); without, all V.
        weights = torch.where(drop, 0.0, (vals - top).exp())
        past = (logits >= kth).sum(-1, keepdim=True) - (~drop).sum(-1, keepdim=True)  # kept by top-k, not ranked
        z = weights.sum(-1, keepdim=True)
        if not bool(limited.all()):
            z = torch.where(limited[:, None], z, (torch.logsumexp(logits, dim=-1, keepdim=True) - top).exp())
        probs = weights / z
        # The unranked tokens are dropped when top-k cuts inside the ranked ones (no tie past them),
        # top-p's mass is reached inside them, or min-p drops the last of them already.
        reached = (top_p < 1.0) & (probs.sum(-1) >= top_p)  # as in `_past_nucleus`: top_p 1 drops none
        exact = torch.where(limited, past[:, 0] == 0, reached | (probs[:, -1] < min_p * probs[:, 0]))
        drop |= _past_nucleus(probs, top_p)
        drop |= probs < min_p[:, None] * probs[:, :1]
        return Ranked(vals.masked_fill(drop, float("-inf")), order, exact, ~limited & (top_p >= 1.0) & (min_p <= 0.0))


def _past_nucleus(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Top-p's drops for probabilities (B, m) ranked in descending order: the tokens whose higher
    ranked ones already hold >= top_p of the mass (transformers' TopPLogitsWarper, vLLM). The first
    always stays as top_p > 0; top_p 1 drops none, whatever the float sums round to."""
    return (top_p[:, None] < 1.0) & (probs.cumsum(dim=-1) - probs >= top_p[:, None])


def _filter_sorted(logits: torch.Tensor, k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """`filter_logits` over a full sort of each row (k from `_top_k`)."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    drop = sorted_logits < sorted_logits.gather(1, (k - 1)[:, None])
    probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
    drop |= _past_nucleus(probs, top_p)
    drop |= probs < min_p[:, None] * probs[:, :1]
    return logits.masked_fill(torch.zeros_like(drop).scatter(1, order, drop), float("-inf"))


def draw(logits: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
    """One index per row of `logits` (B, n), drawn from softmax(logits) (-inf: never), each row by
    the inverse of its cumulative distribution at one uniform number, which a row with a generator
    draws from it alone.

    The cumulative sums run in float64 over exp(logit - max) in the order given, unnormalised
    (the uniform is scaled by the total), so dropping -inf entries from a row or ranking only some
    tokens changes no sum: a row draws the same token from its kept tokens listed in vocabulary
    order, whether the others are there or not. `torch.multinomial` draws an exponential variate
    per token instead (`bench/sampling.py`: 33.6 ms against 6.2 for 32 rows of SmolLM2's logits on
    this project's CPU, temperature 0.7).
    """
    B, n = logits.shape
    dev = logits.device
    if all(g is generators[0] for g in generators):
        u = torch.rand(B, dtype=torch.float64, device=dev, generator=generators[0])
    else:
        u = torch.rand(B, dtype=torch.float64, device=dev)
        for b, g in enumerate(generators):
            if g is not None:
                u[b] = torch.rand(1, dtype=torch.float64, device=dev, generator=g)[0]
    cdf = logits.to(torch.float64, copy=True)  # one (B, n) buffer, worked in place: at a vocabulary's size each new one costs page faults
    cdf.sub_(cdf.max(dim=-1, keepdim=True).values).exp_().cumsum_(dim=-1)
    # right=True: the first entry whose cumulative weight exceeds u * total, never one of zero weight.
    return torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)[:, 0].clamp_(max=n - 1)


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
    x = _biased(raw, params)
    if any(p.penalised for p in params):
        if counts is None or prompt_mask is None:
            raise ValueError("penalties need the generated-token counts and the prompt mask")
        x = apply_penalties(x, counts.to(x.dtype), prompt_mask, col("repetition_penalty"), col("presence_penalty"),
                            col("frequency_penalty"))
    sampled = [b for b, p in enumerate(params) if not p.greedy]
    tokens = x.argmax(dim=-1) if len(sampled) < len(params) else torch.empty(len(params), dtype=torch.long, device=dev)
    if sampled:
        chosen = [params[b] for b in sampled]
        of = lambda name, dtype=torch.float32: torch.tensor([getattr(p, name) for p in chosen], dtype=dtype, device=dev)
        x = x if len(sampled) == len(params) else x[sampled]
        x = _tempered(x, of("temperature"))
        gens = [generators[b] for b in sampled]
        ranked = None
        if any(p.filtered for p in chosen):
            top_k, top_p, min_p = _top_k(of("top_k", torch.long), x.size(-1)), of("top_p"), of("min_p")
            ranked = Ranked.of(x, top_k, top_p, min_p)
            if ranked is None or not bool(ranked.exact.all()):
                x, ranked = _kept(x, top_k, top_p, min_p, ranked), None
        if ranked is not None:  # every kept token is among the ranked ones: draw among those alone, in vocabulary order
            order, by_id = ranked.order.sort(dim=-1)
            picked = draw(ranked.logits.gather(1, by_id), gens)
            tokens[sampled] = order.gather(1, picked[:, None])[:, 0]
        else:
            tokens[sampled] = draw(x, gens)
    return with_logprobs(raw, tokens, params)


def _biased(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Row b's `logit_bias` added to logits (B, V); a new tensor when any row has one (the
    logits may be the caller's)."""
    biased = [(b, t, v) for b, p in enumerate(params) if p.logit_bias for t, v in p.logit_bias.items()]
    if not biased:
        return logits
    rows, ids, values = zip(*biased)
    dev = logits.device
    return logits.index_put((torch.tensor(rows, device=dev), torch.tensor(ids, device=dev)),
                            torch.tensor(values, dtype=logits.dtype, device=dev), accumulate=True)


def _tempered(logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """Logits (B, V) over each row's temperature (B,). Extreme penalties or temperatures can
    overflow: +inf becomes the largest float, NaN is dropped."""
    return (logits / temperature[:, None]).nan_to_num_(nan=float("-inf"), posinf=torch.finfo(logits.dtype).max)


def with_logprobs(logits: torch.Tensor, tokens: torch.Tensor, params: list[SamplingParams]) -> Choice:
    """`tokens` (B,) as a `Choice`, with the raw log-probabilities that any row's `logprobs` asks for."""
    choice = Choice(tokens)
    want = [p.logprobs for p in params if p.logprobs is not None]
    if want:
        logp = torch.log_softmax(logits.float(), dim=-1)
        choice.logprobs = logp.gather(1, tokens[:, None])[:, 0]
        if max(want) > 0:
            choice.top_logprobs, choice.top_ids = logp.topk(max(want), dim=-1)
    return choice


def speculative_sample(logits: torch.Tensor, draft: list[int], params: SamplingParams,
                       generator: torch.Generator | None = None) -> list[int]:
    """A sampled sequence's next tokens from the logits (len(draft) + 1, V) at its newest token and
    at each draft token: draft token d at position j is kept with probability p_j(d), where p_j is
    the row's sampling distribution there (bias, temperature, top-k/top-p/min-p); otherwise the
    token there is drawn from p_j without d, and the rest of the draft is dropped. After a draft
    kept whole, one more token is drawn from the last position.

    This is speculative sampling (Leviathan et al. 2023; Chen et al. 2023) with a draft that puts
    all its mass on one token: each emitted token has exactly the distribution of sampling one
    token at a time. Not for rows with penalties (their counts change from token to token).
    """
    n, m = logits.size(0), len(draft)
    dev = logits.device
    col = lambda value, dtype=torch.float32: torch.full((n,), value, dtype=dtype, device=dev)
    x = _tempered(_biased(logits.float(), [params] * n), col(params.temperature))
    if params.filtered:
        x = filter_logits(x, col(params.top_k, torch.long), col(params.top_p), col(params.min_p))
    # Worked on the device, read back once (a GPU waits for each read): the first rejected position
    # j (m when none is), and the token drawn there from p_j without draft[j] (from p_m after a
    # whole draft). The generator gives the same numbers in the same order as a step-by-step loop.
    d = torch.tensor([*draft, -1], device=dev)  # -1: no draft token at position m
    kept = torch.softmax(x[:m], dim=-1).gather(1, d[:m, None])[:, 0]
    rejected = torch.rand(m, dtype=torch.float64, device=dev, generator=generator) >= kept
    j = torch.where(rejected.any(), rejected.to(torch.uint8).argmax(), m)  # argmax: the first maximum
    row = x.index_select(0, j.view(1))
    row.masked_fill_(torch.arange(row.size(1), device=dev) == d[j], float("-inf"))
    at, token = torch.stack([j, draw(row, [generator])[0]]).tolist()
    return [*draft[:at], token]
