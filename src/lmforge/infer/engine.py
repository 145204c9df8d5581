"""Continuous batching: many requests share one model forward per step, joining and leaving at any step.

The KV cache has one row ("slot") per running sequence; each slot keeps its own length, and a
decode step feeds every running sequence's newest token at its own position (`start` is a
tensor, see `KVCache.update`), so no sequence waits for another and no padding is computed:

    add() ─> waiting ─(free slot)─> prefill, a chunk per step ─> first token ─┐
                                                                             ├─> decode step (all slots) ─> sample ─> emit
                                         running ────────────────────────────┘        │
                                         retire on stop token, stop string, max_tokens or abort: slot freed

Prefill runs in chunks of `prefill_chunk` tokens whose boundaries depend only on the prompt;
requests in neighbouring slots prefill together, each row at its own position, and the output
head runs only at the last prompt position.

Prefix reuse (vLLM's automatic prefix caching, on slots): a freed slot keeps the keys and values
of its tokens until another request needs the slot. A new prompt that begins with tokens some
slot holds, running or freed (the previous turns of a chat, a shared system prompt, the other
`n - 1` copies of a request), takes their keys and values from that slot and prefills only the
rest. `Engine` is single-threaded; `lmforge.serve` drives it from
one thread.
"""

from __future__ import annotations

import functools
import itertools
import types
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from lmforge.infer.sampling import Choice, SamplingParams, sample_rows, speculative_sample, with_logprobs
from lmforge.infer.speculate import NgramDrafter
from lmforge.model import Transformer
from lmforge.utils.device import free_memory
from lmforge.utils.errors import UserError


class TextStream:
    """Token ids in, finished text out: holds back an unfinished UTF-8 character and any text
    that may be the start of a stop string; `push` says when a stop string has appeared.

    `context` is the end of the prompt (up to its last `CONTEXT_TOKENS`): the output is decoded
    after it, as vLLM does, so a decoder that drops the leading space of a text (SentencePiece's
    Strip, Llama 2's) keeps the space the output's first token carries: "is" -> " Paris", which
    the prompt's text and `token_bytes` offsets agree with."""

    CONTEXT_TOKENS = 4

    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str] = (), context: Sequence[int] = ()) -> None:
        self.decode, self.stop = decode, tuple(stop)
        context = list(context)[-self.CONTEXT_TOKENS:]
        whole, lead = len(context), decode(context) if context else ""  # whole: where its text ends on a whole character
        while lead.endswith("\ufffd"):  # the prompt ends inside a character: the output's text completes it
            whole -= 1
            lead = decode(context[:whole]) if whole else ""
        self.ids: list[int] = context  # the context, then the output
        self._context, self._lead = len(context), len(lead)  # left out of every text
        self.text = ""  # everything emitted so far
        self._hold = max((len(s) for s in self.stop), default=1) - 1
        # Incremental decoding (as vLLM does): `_done` is the text of ids[:_read], which ends on a
        # whole character; new tokens are decoded with the tokens from `_prefix` on as context
        # (some decoders drop a leading space at the start of a text), so each push decodes a few
        # tokens instead of the whole output.
        self._done, self._prefix, self._read = lead, 0, whole

    def _full(self) -> str:
        """The output's text: decode(self.ids) without the context's, decoding only the last few tokens."""
        head = self.decode(self.ids[self._prefix:self._read]) if self._read > self._prefix else ""
        both = self.decode(self.ids[self._prefix:])
        full = self._done + both[len(head):] if both.startswith(head) else self.decode(self.ids)
        if not full.endswith("\ufffd"):
            self._done, self._prefix, self._read = full, self._read, len(self.ids)
        return full[self._lead:]

    def push(self, token: int) -> tuple[str, bool]:
        """(new text, whether a stop string ended the text)."""
        self.ids.append(token)
        full = self._full()
        if self.stop:
            # A stop string can only have appeared in the tail that was not emitted yet.
            lo = max(0, len(self.text) - self._hold)
            hits = [i for s in self.stop if (i := full.find(s, lo)) >= 0]
            if hits:
                return self._emit(full[: min(hits)]), True
        if full.endswith("\ufffd"):  # a byte-level token ended inside a multi-byte character
            return "", False
        safe = len(full)
        for n in range(min(self._hold, len(full)), 0, -1):
            if any(s.startswith(full[-n:]) for s in self.stop):
                safe = len(full) - n
                break
        return self._emit(full[:safe]), False

    def flush(self) -> str:
        """The held-back text, once the sequence has ended without a stop string."""
        return self._emit(self.decode(self.ids)[self._lead:]) if len(self.ids) > self._context else ""

    def _emit(self, upto: str) -> str:
        delta = upto[len(self.text):] if upto.startswith(self.text) else ""
        self.text = max(self.text, upto, key=len)
        return delta


@dataclass(eq=False)
class Request:
    """One sequence: its prompt, options and, as the engine runs it, its output."""

    id: str
    prompt: list[int]
    params: SamplingParams
    output: list[int] = field(default_factory=list)
    logprobs: list[dict] = field(default_factory=list)
    prompt_logprobs: list[dict] = field(default_factory=list)  # with params.prompt_logprobs: one per prompt token after the first
    text: str = ""
    finish_reason: str | None = None  # "stop", "length" or "abort" once finished
    slot: int | None = None
    prefilled: int = 0  # prompt tokens already in the cache
    stream: TextStream | None = None
    generator: torch.Generator | None = None
    drafter: NgramDrafter | None = None  # prompt and output so far, for speculative drafts

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class Event:
    """What one step did for a request: a new token (None when the step only finished it) and
    the new text; `finished` on the last event of the request."""

    request: Request
    token: int | None
    text: str
    logprob: dict | None = None
    finished: bool = False


def _decode_step(model: Transformer, tokens: torch.Tensor, start: torch.Tensor, cache) -> torch.Tensor:
    """Logits (B, V) for one new token per slot, each at its own position."""
    logits = model(tokens[:, None], cache=cache, start=start)[:, -1]
    V = model.config.vocab_size
    return logits if logits.size(-1) == V else logits[:, :V]


def _verify_step(model: Transformer, tokens: torch.Tensor, start: torch.Tensor, cache) -> torch.Tensor:
    """Hidden states (B, T, C) of T tokens per slot (the newest and a draft), from each slot's own
    position: the engine applies the head only where a request needs logits."""
    return model.encode(tokens, cache=cache, start=start)


def span_buckets(max_seq_len: int, smallest: int = 256) -> list[int]:
    """The key lengths a compiled decode step is specialised for: doubling from `smallest` up to
    `max_seq_len`. A step attends over the smallest that holds every slot, so short sequences do
    not read a long context's worth of cache, for one compiled graph per bucket."""
    spans, n = [], smallest
    while n < max_seq_len:
        spans.append(n)
        n *= 2
    return [*spans, max_seq_len]


MIN_REUSE = 16  # prompt tokens a copy from another slot must save (fewer cost about as much to prefill)


def _position(req: Request) -> int:
    """Where a decoding request's newest token goes in the cache."""
    return len(req.prompt) + len(req.output) - 1


def _common_prefix(a: Sequence[int], b: Sequence[int], limit: int) -> int:
    """The length of the longest common prefix of `a` and `b`, at most `limit`. Slice comparisons
    run in C: windows that double in size from the start (so two unrelated sequences cost one
    short comparison and a shared prefix about twice its length), then bisection inside the first
    window that differs."""
    n = min(len(a), len(b), limit)
    lo, size = 0, MIN_REUSE
    while lo < n:
        hi = min(lo + size, n)
        if a[lo:hi] != b[lo:hi]:
            break
        lo, size = hi, 2 * size
    else:
        return n
    while hi - lo > 1:  # a[lo:hi] differs from b[lo:hi]; everything before lo is equal
        mid = (lo + hi) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo


def check_prompt_ids(prompt: Sequence[int], vocab_size: int) -> None:
    """Refuse a prompt holding a token id the model has no embedding for (the embedding would raise an IndexError)."""
    if (bad := next((t for t in prompt if not 0 <= t < vocab_size), None)) is not None:
        raise UserError(f"the prompt holds token id {bad}, outside the model's vocabulary of {vocab_size}")


class Engine:
    """Runs requests to completion `max_batch` at a time; call `step()` until `has_work` is False.

    `tokenizer` (with `decode` and `end_ids`) gives text, stop strings and the end-of-text stops;
    without one the engine works on token ids only. `max_waiting` bounds the queue (`add` raises
    `QueueFull` beyond it). A step prefills chunks until `prefill_budget` prompt tokens (default
    one chunk's worth), so long prompts do not stall the running sequences. `compile` compiles
    the decode step with torch.compile over a fixed batch of all slots and one of `span_buckets`
    key lengths (static shapes), all of them when the engine is built. On CUDA each is then
    captured in a CUDA graph: `graphs="capture"` captures and replays them by hand
    (`CapturedDecode`), `graphs="trees"` leaves it to torch.compile's "reduce-overhead" mode.
    `prefix_cache` reuses the keys and values of prompt prefixes that slots hold (see the module's
    docstring); `reused_tokens` counts the prompt tokens it saved. `speculate` k > 0 drafts up to k
    tokens per sequence without penalties by prompt lookup (`lmforge.infer.speculate`) and checks them in the
    decode step, which then feeds each sequence its newest token and its draft (compiled too, for
    k + 1 tokens a slot, when the engine is); `drafted` and `accepted` count the draft tokens
    proposed and kept.
    """

    def __init__(
        self,
        model: Transformer,
        tokenizer=None,
        max_batch: int = 16,
        max_seq_len: int | None = None,
        prefill_chunk: int = 256,
        max_waiting: int | None = None,
        compile: bool = False,
        prefill_budget: int | None = None,
        graphs: str = "capture",
        prefix_cache: bool = True,
        speculate: int = 0,
    ) -> None:
        if model.config.arch != "decoder":
            raise UserError(f"the engine runs decoder-only models; this checkpoint is an {model.config.arch} model "
                            "(use lmforge.infer.generate_tokens or beam_search for an encoder-decoder)")
        if graphs not in ("capture", "trees"):
            raise UserError(f"graphs must be capture or trees, got {graphs!r}")
        if speculate < 0:
            raise UserError(f"speculate must be >= 0 draft tokens, got {speculate}")
        if max_batch < 1 or prefill_chunk < 1 or (max_seq_len is not None and max_seq_len < 2):
            raise UserError(f"max_batch and prefill_chunk must be >= 1 and max_seq_len >= 2, "
                            f"got {max_batch}, {prefill_chunk} and {max_seq_len}")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_seq_len = min(max_seq_len or model.config.context_length, model.config.context_length)
        self.max_batch, self.prefill_chunk, self.max_waiting = max_batch, prefill_chunk, max_waiting
        self.prefill_budget = prefill_budget or prefill_chunk
        self.device = model.tok_embeddings.weight.device
        c, itemsize = model.config, model.tok_embeddings.weight.element_size()
        self.cache_bytes = 2 * c.n_layer * max_batch * c.kv_heads * self.max_seq_len * c.head_size * itemsize
        free = free_memory(self.device)
        if free is not None and self.cache_bytes > 0.9 * free:
            raise UserError(
                f"the KV cache for {max_batch} sequences of {self.max_seq_len} tokens needs {self.cache_bytes / 2**30:.1f} GiB "
                f"and {free / 2**30:.1f} GiB is free; lower max_batch or max_seq_len (lmforge serve: --max-batch, --max-seq-len)")
        self.cache = model.new_cache(max_batch, self.max_seq_len)
        self.slots: list[Request | None] = [None] * max_batch
        self.waiting: deque[Request] = deque()
        self.counts: torch.Tensor | None = None  # (slots, V) generated-token counts, once a request uses penalties
        self.prompt_mask: torch.Tensor | None = None
        self._ids = itertools.count()
        self.prefix_cache, self.reused_tokens = prefix_cache, 0
        self.kept: list[list[int]] = [[] for _ in range(max_batch)]  # the tokens whose keys/values a free slot holds
        self._freed_at = [0] * max_batch  # the step that freed each slot: the least recently freed goes first
        self._steps = 0
        self.speculate, self.drafted, self.accepted = speculate, 0, 0
        self.compiled = compile
        self._decode: Callable[[Transformer, torch.Tensor, torch.Tensor, object], torch.Tensor] = _decode_step
        self._verify: Callable[[Transformer, torch.Tensor, torch.Tensor, object], torch.Tensor] | None = None
        self.spans = span_buckets(self.max_seq_len) if compile else []  # the key spans compiled for
        self.graphs = graphs if compile and self.device.type == "cuda" else None
        if compile:
            self._spans = [self.cache.spanning(n) for n in self.spans]
            self._decode = self._compile(_decode_step)
            if speculate:
                self._verify = self._compile(_verify_step)
            self._warm_up()

    # ---- requests -------------------------------------------------------------------------

    def add(self, prompt: Sequence[int], params: SamplingParams | None = None, request_id: str | None = None) -> Request:
        """Queue a request; raises UserError when it cannot fit the context, `QueueFull` when the queue is full."""
        req = self.make_request(prompt, params, request_id)
        if self.max_waiting is not None and (waiting := self.unseated()) >= self.max_waiting:
            raise QueueFull(f"{waiting} sequences are waiting already (the queue's bound); try again later")
        self.enqueue(req)
        return req

    def unseated(self, arriving: int = 0) -> int:
        """The queued sequences (with `arriving` more on their way) that the next step has no free slot
        for: what `max_waiting` bounds, so that an idle engine takes max_batch requests at once. Reads
        two counts: safe from another thread."""
        return max(0, len(self.waiting) + arriving - (self.max_batch - self.running))

    def make_request(self, prompt: Sequence[int], params: SamplingParams | None = None, request_id: str | None = None) -> Request:
        """A checked request, not queued yet (reads only the configuration: safe from another thread)."""
        params = params or SamplingParams()
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise UserError("the prompt is empty; give at least one token of text")
        V = self.model.config.vocab_size
        check_prompt_ids(prompt, V)
        if any(t >= V for t in params.logit_bias or ()):
            raise UserError(f"logit_bias token ids must be in [0, {V})")
        if any(not 0 <= t < V for t in params.stop_token_ids):
            raise UserError(f"stop_token_ids must be token ids in [0, {V})")
        if len(prompt) + params.max_tokens > self.max_seq_len:
            raise UserError(
                f"the prompt is {len(prompt)} tokens and max_tokens is {params.max_tokens}: {len(prompt) + params.max_tokens} "
                f"tokens exceed the context of {self.max_seq_len}; shorten the prompt or lower max_tokens"
            )
        req = Request(request_id if request_id is not None else f"req-{next(self._ids)}", prompt, params)
        if self.tokenizer is not None:
            decode = self.tokenizer.decode
            if params.skip_special_tokens:
                decode = functools.partial(decode, skip_special_tokens=True)
            req.stream = TextStream(decode, params.stop, context=prompt)
        if params.seed is not None:
            req.generator = torch.Generator(device=self.device).manual_seed(params.seed)
        return req

    def enqueue(self, req: Request) -> None:
        """Queue a request from `make_request` (no bound check: the caller keeps its own)."""
        self.waiting.append(req)

    def abort(self, request_id: str) -> Request | None:
        """Drop a waiting or running request at once (its slot is free for the next step)."""
        for req in self.waiting:
            if req.id == request_id:
                self.waiting.remove(req)
                req.finish_reason = "abort"
                return req
        for req in self.slots:
            if req is not None and req.id == request_id:
                req.finish_reason = "abort"
                self._free(req)
                return req
        return None

    def abort_all(self, reason: str = "abort") -> list[Request]:
        """Finish every waiting and running request with `reason` (after an error in a step)."""
        reqs = list(self.waiting) + [r for r in self.slots if r is not None]
        self.waiting.clear()
        self.slots = [None] * self.max_batch
        self.kept = [[] for _ in range(self.max_batch)]  # a failed step may have left anything in the cache
        for req in reqs:
            req.finish_reason = reason
        return reqs

    @property
    def running(self) -> int:
        return sum(r is not None for r in self.slots)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting) or self.running > 0

    # ---- the step -------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[Event]:
        """Admit waiting requests into free slots, prefill a chunk of each new one, decode one
        token for every running sequence, retire the finished ones. Returns what happened."""
        events: list[Event] = []
        self._steps += 1
        while self.waiting and None in self.slots:
            req = self.waiting.popleft()
            self._admit(req, self._pick_slot(req.prompt))
        self._prefill(events)
        decoding = [r for r in self.slots if r is not None and r.prefilled == len(r.prompt) and r.output]
        if decoding:
            self._decode_all(decoding, events)
        return events

    def _pick_slot(self, prompt: list[int]) -> int:
        """A free slot for `prompt`: the one holding the longest prefix of it (at least MIN_REUSE
        tokens); else, among the slots a decode step runs anyway, the lowest empty one, else the
        one freed longest ago; else the lowest free slot.

        A compiled step runs every slot. An eager one runs the slots up to the highest running
        one, so a request that goes past them makes every step run more rows: one request at a
        time then takes the lowest slot, as it would without prefix reuse."""
        free = [s for s, r in enumerate(self.slots) if r is None]
        if not self.prefix_cache:
            return free[0]
        match = {s: _common_prefix(self.kept[s], prompt, len(prompt) - 1) for s in free}
        best = max(free, key=match.__getitem__)
        if match[best] >= MIN_REUSE:
            return best
        hi = self.max_batch if self.compiled else max((s + 1 for s, r in enumerate(self.slots) if r is not None), default=0)
        pool = [s for s in free if s < hi] or free[:1]
        return min(pool, key=lambda s: (1, self._freed_at[s]) if self.kept[s] else (0, s))

    def _admit(self, req: Request, slot: int) -> None:
        req.slot = slot
        self.slots[slot] = req
        kept, self.kept[slot] = self.kept[slot], []
        if self._reuses(req):  # the slot's own keys and values for a prefix of the prompt stay where they are
            req.prefilled = _common_prefix(kept, req.prompt, len(req.prompt) - 1)
            self.reused_tokens += req.prefilled
        if req.params.penalised and self.counts is None:
            V = self.model.config.vocab_size
            self.counts = torch.zeros(self.max_batch, V, device=self.device)
            self.prompt_mask = torch.zeros(self.max_batch, V, dtype=torch.bool, device=self.device)
        if self.counts is not None:
            self.counts[slot] = 0
            self.prompt_mask[slot] = False
            self.prompt_mask[slot, torch.tensor(req.prompt, device=self.device)] = True

    def _prefill(self, events: list[Event]) -> None:
        """The next chunk of each prefilling request, up to `prefill_budget` tokens; requests in
        neighbouring slots share one forward."""
        budget, chosen = self.prefill_budget, []
        for s, req in enumerate(self.slots):
            if req is not None and req.prefilled < len(req.prompt):
                if budget <= 0:
                    break
                if self._reuses(req):
                    self._borrow(req)
                    if any(self._will_lend(self.slots[c], req) for c in chosen):
                        continue  # a request prefilling this step computes our next tokens: copy them next step
                chosen.append(s)
                budget -= min(self.prefill_chunk, len(req.prompt) - req.prefilled)
        run: list[int] = []
        for s in chosen:
            if run and s != run[-1] + 1:
                self._prefill_rows(run, events)
                run = []
            run.append(s)
        if run:
            self._prefill_rows(run, events)

    def _prefill_rows(self, slots: list[int], events: list[Event]) -> None:
        """One chunk for each request in consecutive `slots`, in one forward.

        A single request runs alone (its exact length, causal attention). Several run as rows at
        their own positions (`start` a tensor), right-padded to the longest chunk: a padding token
        writes its key past its row's prompt, where the row writes again before it ever reads.
        """
        reqs = [self.slots[s] for s in slots]
        chunks = [r.prompt[r.prefilled: r.prefilled + self.prefill_chunk] for r in reqs]
        L = max(len(c) for c in chunks)
        if len(reqs) > 1 and max(r.prefilled for r in reqs) + L > self.max_seq_len:
            for s in slots:  # padding would run past the cache: one at a time
                self._prefill_rows([s], events)
            return
        if len(reqs) == 1:
            req = reqs[0]
            idx = torch.tensor(chunks, device=self.device)
            h = self.model.encode(idx, cache=self.cache.rows(req.slot, req.slot + 1), start=req.prefilled)
        else:
            idx = torch.tensor([c + [0] * (L - len(c)) for c in chunks], device=self.device)
            start = torch.tensor([r.prefilled for r in reqs], device=self.device)
            n = -(-(max(r.prefilled for r in reqs) + L) // 16) * 16
            h = self.model.encode(idx, cache=self.cache.rows(slots[0], slots[-1] + 1, length=n, start=start, T=L), start=start)
        for b, (req, chunk) in enumerate(zip(reqs, chunks)):
            if req.params.prompt_logprobs is not None:
                self._score_prompt(req, h[b, : len(chunk)])
        h = h[torch.arange(len(reqs), device=self.device), torch.tensor([len(c) - 1 for c in chunks], device=self.device)]
        done = []
        for b, (req, chunk) in enumerate(zip(reqs, chunks)):
            req.prefilled += len(chunk)
            if req.prefilled == len(req.prompt):
                if req.params.max_tokens == 0:  # scored, nothing to generate
                    req.finish_reason = "length"
                    self._free(req)
                    events.append(Event(req, None, "", finished=True))
                else:
                    done.append(b)
        if done:
            if len(done) < len(reqs):
                h = h[torch.tensor(done, device=self.device)]
            # The head only at the last position of each finished prompt (B, V).
            logits = self.model.output(h)[:, : self.model.config.vocab_size]
            self._sample([reqs[b] for b in done], logits, events)

    def _reuses(self, req: Request) -> bool:
        """Whether `req` may take keys and values of its prompt from an earlier one: not when it
        scores its prompt, whose every position it must compute."""
        return self.prefix_cache and req.params.prompt_logprobs is None

    def _score_prompt(self, req: Request, h: torch.Tensor) -> None:
        """The log-probabilities of `req`'s prompt tokens that this chunk's hidden states `h` (T, D)
        predict: position i's for token i + 1, from the model's raw logits (vLLM's prompt_logprobs)."""
        targets = req.prompt[req.prefilled + 1: req.prefilled + 1 + len(h)]
        if not targets:  # the prompt's last position predicts the first generated token
            return
        logp = torch.log_softmax(self.model.output(h[: len(targets)])[:, : self.model.config.vocab_size].float(), dim=-1)
        chosen = logp.gather(1, torch.tensor(targets, device=self.device)[:, None])[:, 0].tolist()
        top_lp, top_ids = logp.topk(req.params.prompt_logprobs, dim=-1)
        for t, lp, ids, lps in zip(targets, chosen, top_ids.tolist(), top_lp.tolist()):
            req.prompt_logprobs.append({"token": t, "logprob": lp, "top": list(zip(ids, lps))})

    def _held(self, s: int) -> list[int]:
        """The tokens whose keys and values slot `s` holds, from position 0."""
        req = self.slots[s]
        if req is None:
            return self.kept[s]
        # A prompt's prefilled part, then every output token but the newest (its key is written
        # by the decode step that feeds it).
        return req.prompt[: req.prefilled] if req.prefilled < len(req.prompt) else (req.prompt + req.output[:-1])

    def _held_len(self, s: int) -> int:
        req = self.slots[s]
        if req is None:
            return len(self.kept[s])
        return req.prefilled if req.prefilled < len(req.prompt) else _position(req)

    def _held_token(self, s: int, i: int) -> int:
        """Token i of `_held(s)` (i < `_held_len(s)`), without building the list."""
        req = self.slots[s]
        if req is None:
            return self.kept[s][i]
        return req.prompt[i] if i < len(req.prompt) else req.output[i - len(req.prompt)]

    def _borrow(self, req: Request) -> None:
        """Copy the keys and values of the longest prefix of `req`'s prompt that another slot holds
        (at least MIN_REUSE tokens past what `req` has); at least the last prompt token is left to prefill."""
        limit, best, src = len(req.prompt) - 1, req.prefilled + MIN_REUSE - 1, None
        if best >= limit:
            return
        for s in range(self.max_batch):
            if s != req.slot and self._held_len(s) > best and self._held_token(s, best) == req.prompt[best]:
                if (n := _common_prefix(self._held(s), req.prompt, limit)) > best:
                    best, src = n, s
        if src is not None:
            a, b = req.prefilled, best
            for t in self.cache.k + self.cache.v:
                t[req.slot, :, a:b] = t[src, :, a:b]
            self.reused_tokens += b - a
            req.prefilled = b

    def _will_lend(self, leader: Request, req: Request) -> bool:
        """Whether `leader`'s prefill chunk this step computes at least MIN_REUSE of the tokens `req` would."""
        p = req.prefilled
        if leader.prefilled > p or leader.prompt[p: p + MIN_REUSE] != req.prompt[p: p + MIN_REUSE]:
            return False
        end = min(leader.prefilled + self.prefill_chunk, len(req.prompt) - 1)
        return end - p >= MIN_REUSE and _common_prefix(leader.prompt, req.prompt, end) - p >= MIN_REUSE

    def _free(self, req: Request) -> None:
        """Retire `req` from its slot; the slot keeps its keys and values for a later prompt."""
        self.kept[req.slot] = self._held(req.slot) if self.prefix_cache else []  # a new list: the request is still in the slot
        self._freed_at[req.slot] = self._steps
        self.slots[req.slot] = None

    def _decode_all(self, decoding: list[Request], events: list[Event]) -> None:
        """One decode step for every decoding sequence: its newest token, and with `speculate` its draft."""
        self._decode_rows(decoding, self._drafts(decoding) if self.speculate else {}, events)

    def _decode_rows(self, decoding: list[Request], drafts: dict[int, list[int]], events: list[Event]) -> None:
        """One forward of T tokens a row (the newest token and the draft, padded). Each draft fits
        the cache, but its padding may not beside a longer one near the end of the cache: such
        rows go in a forward of their own, so that no request's draft depends on its neighbours.

        A compiled engine feeds a fixed T: 1, or with drafts `speculate` + 1 unless some row is
        too near the end of the cache for that many (then the step runs eagerly).

        Every slot in [0, hi) takes part; a row that is not decoding writes T positions where
        nothing it holds is lost: past what it holds (its prefill, its output so far, the tokens
        a free slot keeps), or else in a window whose keys and values are put back after."""
        T = 1 + max((len(drafts.get(r.slot, ())) for r in decoding), default=0)
        eager = not self.compiled or (T > 1 and any(_position(r) + self.speculate >= self.max_seq_len for r in decoding))
        if not eager and T > 1:
            T = self.speculate + 1
        tight = [r for r in decoding if _position(r) + T > self.max_seq_len] if eager else []
        if tight:  # never all of them: a row with the longest draft fits its own T
            self._decode_rows([r for r in decoding if _position(r) + T <= self.max_seq_len], drafts, events)
            self._decode_rows(tight, drafts, events)
            return
        hi = max(r.slot for r in decoding) + 1 if eager else self.max_batch
        tokens, start = [[0] * T for _ in range(hi)], [self._held_len(s) for s in range(hi)]
        for req in decoding:
            draft = drafts.get(req.slot, [])
            tokens[req.slot][: 1 + len(draft)] = [req.output[-1], *draft]
            start[req.slot] = _position(req)
        need = max(p for s, p in enumerate(start) if self.slots[s] is not None) + T
        if eager:
            # Attend over the live positions only, rounded up to 16 so that the vectorised sums
            # group the real keys the same way at any length (masked keys add exact zeros). The
            # view's writes must land inside it.
            room = limit = min(-(-need // 16) * 16, self.max_seq_len)
        else:  # static shapes: all slots, and the shortest span that holds every slot's position
            # (a slot still prefilling near the end may not hold T more: it writes in the put-back window)
            cache = next(c for c in self._spans if c.span >= min(need, self.max_seq_len))
            room, limit = cache.span, self.max_seq_len  # a span view writes anywhere in the buffers
        decoding_slots = {r.slot for r in decoding}
        clobbered = []
        for s in range(hi):
            if s not in decoding_slots and start[s] + T > limit:
                start[s] = limit - T
                clobbered.append(s)
        tokens_t, start_t = torch.tensor(tokens, device=self.device), torch.tensor(start, device=self.device)
        if clobbered:
            rows = torch.tensor(clobbered, device=self.device)
            saved = [t[rows, :, limit - T: limit] for t in self.cache.k + self.cache.v]
        if eager:  # the view works out the write index and the mask once for all layers
            cache = self.cache.rows(0, hi, length=room, start=start_t, T=T)
        if T == 1:
            logits = self._decode(self.model, tokens_t[:, 0], start_t, cache)
        else:
            h = (_verify_step if eager else self._verify)(self.model, tokens_t, start_t, cache)
        if clobbered:
            for t, kept in zip(self.cache.k + self.cache.v, saved):
                t[rows, :, limit - T: limit] = kept
        if T > 1:
            self._accept_drafts(decoding, drafts, h, events)
            return
        if len(decoding) < logits.size(0):  # some slots in [0, hi) are not decoding
            logits = logits.index_select(0, torch.tensor([r.slot for r in decoding], device=self.device))
        self._sample(decoding, logits, events)

    def _accept_drafts(self, decoding: list[Request], drafts: dict[int, list[int]], h: torch.Tensor, events: list[Event]) -> None:
        """From the hidden states (hi, T, C) of a step that fed drafts: the head at each decoding
        row's newest token and draft positions. A greedy row keeps its draft up to the first
        token the model would not have chosen, and the model's choice there; a sampled row keeps
        each draft token with the probability its distribution gives it (`speculative_sample`).
        Rows without a draft take one token as in a plain step."""
        rows = [(req, j) for req in decoding for j in range(1 + len(drafts.get(req.slot, [])))]  # (request, position)
        at = torch.tensor([(req.slot, j) for req, j in rows], device=self.device)
        logits = self.model.output(h[at[:, 0], at[:, 1]])[:, : self.model.config.vocab_size]
        own = [i for i, (r, _) in enumerate(rows) if not (r.slot in drafts and not r.params.greedy)]  # rows sample_rows decides
        chosen = [0] * len(rows)
        if own:
            picked = self._choose([rows[i][0] for i in own], logits[torch.tensor(own, device=self.device)]).tokens.tolist()
            for i, t in zip(own, picked):
                chosen[i] = t
        first = [i for i, (_, j) in enumerate(rows) if j == 0]  # each request's first row
        for req, i in zip(decoding, first):
            draft = drafts.get(req.slot, [])
            if draft and not req.params.greedy:
                kept = speculative_sample(logits[i: i + 1 + len(draft)], draft, req.params, req.generator)
                chosen[i: i + len(kept)] = kept
        choice = with_logprobs(logits, torch.tensor(chosen, device=self.device), [r.params for r, _ in rows])
        for req, i in zip(decoding, first):
            draft = drafts.get(req.slot, [])
            for j in range(1 + len(draft)):
                self._take(req, chosen[i + j], choice, i + j, events)
                hit = j < len(draft) and chosen[i + j] == draft[j]
                self.accepted += hit
                if req.finished or not hit:
                    break

    def _drafts(self, decoding: list[Request]) -> dict[int, list[int]]:
        """slot -> draft tokens, for the sequences without penalties (no counts change between
        the draft positions). A draft depends on its own sequence alone; it stops short of the
        request's max_tokens, and so inside the cache."""
        drafts = {}
        for req in decoding:
            if req.params.penalised:
                continue
            if req.drafter is None:
                req.drafter = NgramDrafter(req.prompt)
            req.drafter.extend(req.output[len(req.drafter.tokens) - len(req.prompt):])
            draft = req.drafter.draft(min(self.speculate, req.params.max_tokens - len(req.output) - 1))
            if draft:
                drafts[req.slot] = draft
                self.drafted += len(draft)
        return drafts

    def _choose(self, reqs: list[Request], logits: torch.Tensor) -> Choice:
        counts = mask = None
        if self.counts is not None:
            rows = torch.tensor([r.slot for r in reqs], device=self.device)
            counts, mask = self.counts.index_select(0, rows), self.prompt_mask.index_select(0, rows)
        return sample_rows(logits, [r.params for r in reqs], [r.generator for r in reqs], counts, mask)

    def _sample(self, reqs: list[Request], logits: torch.Tensor, events: list[Event]) -> None:
        choice = self._choose(reqs, logits)
        for b, (req, token) in enumerate(zip(reqs, choice.tokens.tolist())):
            self._take(req, token, choice, b, events)

    def _take(self, req: Request, token: int, choice: Choice, b: int, events: list[Event]) -> None:
        """Append `token` (row b of `choice`) to `req`'s output and emit its event."""
        req.output.append(token)
        if self.counts is not None:
            self.counts[req.slot, token] += 1
        logprob = None
        if req.params.logprobs is not None:
            top = []
            if req.params.logprobs > 0:
                k = req.params.logprobs
                top = list(zip(choice.top_ids[b, :k].tolist(), choice.top_logprobs[b, :k].tolist()))
            logprob = {"token": token, "logprob": float(choice.logprobs[b]), "top": top}
            req.logprobs.append(logprob)
        events.append(self._advance(req, token, logprob))

    def _advance(self, req: Request, token: int, logprob: dict | None) -> Event:
        p = req.params
        ends = self.tokenizer.end_ids if self.tokenizer is not None and not p.ignore_eos else ()
        text, reason = "", None
        if token in p.stop_token_ids or token in ends:
            reason = "stop"  # the stop token counts as generated but adds no text
            text = req.stream.flush() if req.stream is not None else ""
        elif req.stream is not None:
            text, hit = req.stream.push(token)
            reason = "stop" if hit else None
        if reason is None and len(req.output) >= p.max_tokens:
            reason = "length"
            text += req.stream.flush() if req.stream is not None else ""
        if reason is not None:
            req.finish_reason = reason
            self._free(req)
        req.text += text
        return Event(req, token, text, logprob, finished=reason is not None)

    # ---- conveniences ---------------------------------------------------------------------

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[Request]:
        """Run `prompts` to completion (batched generation); the finished requests, in order."""
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        reqs = [self.add(p, sp) for p, sp in zip(prompts, params)]
        while self.has_work:
            self.step()
        return reqs

    def _compile(self, fn: Callable):
        """A step (`_decode_step`, `_verify_step`) under torch.compile, for a fixed batch of all slots.

        On CUDA it is captured in CUDA graphs: by `CapturedDecode`, or with "trees" by
        torch.compile's "reduce-overhead", the cache buffers marked static so that the graphs may
        write them in place. On CPU the generated code is called
        through inductor's C++ wrapper: at one token per row, a Python wrapper that checks and
        reinterprets every buffer costs as much as the model (0.15 against 0.12 ms per step for
        `tiny`, see README).

        Each engine compiles its own copy of the step's code: dynamo keeps graphs, and counts
        recompiles against `recompile_limit` (8), per code object, so one engine's span buckets
        must not push another's out; the limit is raised for an engine with more buckets.
        """
        config = torch._dynamo.config
        config.recompile_limit = max(config.recompile_limit, len(self.spans))
        step = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__)
        if self.graphs == "trees":
            mark = getattr(torch._dynamo, "mark_static_address", None)
            if mark is not None:
                for t in self.cache.k + self.cache.v:
                    mark(t)
            return torch.compile(step, mode="reduce-overhead", dynamic=False)
        if self.graphs == "capture":
            return torch.compile(step, dynamic=False)  # captured by CapturedDecode in _warm_up
        return torch.compile(step, dynamic=False, options={"cpp_wrapper": True})

    @torch.inference_mode()
    def _warm_up(self) -> None:
        """Compile (and on CUDA capture) the decode step for every span now rather than inside a
        request. Every slot writes keys from position 0, which its prefill overwrites before anything reads them."""
        steps = {"_decode": (self.max_batch,), "_verify": (self.max_batch, self.speculate + 1)}  # the tokens' shapes
        for name, shape in steps.items():
            step = getattr(self, name)
            if step is None:
                continue
            tokens = torch.zeros(shape, dtype=torch.long, device=self.device)
            if self.graphs == "capture":
                setattr(self, name, CapturedDecode(step, self.model, self._spans, tokens, self.device))
                continue
            start = torch.zeros(self.max_batch, dtype=torch.long, device=self.device)  # as in _decode_rows
            for cache in self._spans:
                for _ in range(3):  # CUDA graph trees record on the second call and replay from the third
                    step(self.model, tokens, start, cache)


class CapturedDecode:
    """A compiled decode (or verify) step captured in one CUDA graph per key span, replayed by hand.

    torch.compile's own CUDA graphs ("reduce-overhead") pay host time at every call: dynamo
    evaluates its guards, which cover every parameter of the model, and the graph-tree wrapper
    checks every input. On the CPU, `bench/decode.py --profile` puts the guards' lookup at 0.38 ms
    per step for GPT-2 124M (README, Serving); on a GPU its whole decode step should take a
    fraction of a millisecond, so that host time would not be hidden. A replay is one call.
    SGLang and vLLM capture their compiled forwards the same way.

    The token and position inputs are copied into static buffers, and the logits (hidden states
    for a verify step) come back in the graph's static output, valid until the next call (the
    engine reads it first). A step's graphs share one memory pool: they never run at the same time.
    """

    def __init__(self, step: Callable, model: Transformer, spans: list, tokens: torch.Tensor, device: torch.device) -> None:
        self.tokens = torch.zeros_like(tokens)  # (slots,) or (slots, T)
        self.start = torch.zeros(tokens.size(0), dtype=torch.long, device=device)
        # Compile and run each span once away from the capture, on a side stream, as capture requires.
        # Every slot writes keys from position 0, which its prefill overwrites before anything reads them.
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for cache in spans:
                for _ in range(2):
                    step(model, self.tokens, self.start, cache)
        torch.cuda.current_stream(device).wait_stream(side)
        pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        for cache in spans:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                logits = step(model, self.tokens, self.start, cache)
            self.graphs[cache.span] = (graph, logits)

    def __call__(self, model: Transformer, tokens: torch.Tensor, start: torch.Tensor, cache) -> torch.Tensor:
        self.tokens.copy_(tokens)
        self.start.copy_(start)
        graph, logits = self.graphs[cache.span]
        graph.replay()
        return logits


class QueueFull(UserError):
    """The engine's waiting queue is at its bound (a server answers 429)."""
