"""The bridge between asyncio request handlers and the engine: the engine steps on its own
thread, each request reads its events from an asyncio queue, and nothing holds a lock across a step.

    handler ─ submit(): check, then inbox.put(add) ─┐
    handler ─ abort() (client gone): inbox.put ─────┤
                                                    └─> engine thread: drain inbox ─> step() ─> events
                                                          ─> outbox per event loop (one hand-over pending at most) ─> asyncio.Queue (per request)
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from lmforge.infer import Engine, Event, QueueFull, SamplingParams

log = logging.getLogger("lmforge.serve")


class Metrics:
    """Prometheus metrics of one server, in their own registry (several apps may live in one process).

    A client request (one HTTP request) runs as a sequence per prompt and copy (`n`): the request
    counters and histograms count client requests, the token counters count tokens as the
    response's `usage` does (each prompt once, whatever `n`; every sequence's generated tokens)."""

    def __init__(self, engine: Engine) -> None:
        self.registry = r = CollectorRegistry()
        Gauge("lmforge_queue_length", "sequences waiting for a slot (n per prompt of a client request)",
              registry=r).set_function(lambda: len(engine.waiting))
        Gauge("lmforge_running_sequences", "sequences holding a KV-cache slot", registry=r).set_function(lambda: engine.running)
        Gauge("lmforge_slots", "KV-cache slots (the most sequences decoded at once)", registry=r).set(engine.max_batch)
        Gauge("lmforge_prefix_reused_tokens", "prompt tokens whose keys and values were reused, not prefilled (since start)",
              registry=r).set_function(lambda: engine.reused_tokens)
        Gauge("lmforge_draft_tokens", "speculative draft tokens proposed (since start)", registry=r).set_function(lambda: engine.drafted)
        Gauge("lmforge_draft_tokens_accepted", "speculative draft tokens the model confirmed (since start)",
              registry=r).set_function(lambda: engine.accepted)
        self.tokens_per_second = Gauge("lmforge_tokens_per_second", "generated tokens per second over the last second", registry=r)
        self.generated = Counter("lmforge_generated_tokens", "generated tokens of every sequence (as usage.completion_tokens "
                                 "counts them, and those of requests cancelled on the way)", registry=r)
        self.prompt = Counter("lmforge_prompt_tokens", "prompt tokens of client requests, each prompt once whatever n (as "
                              "usage.prompt_tokens counts them), at a request's first token: none of one cancelled before",
                              registry=r)
        self.requests = Counter("lmforge_requests", "finished client requests (an HTTP request, whatever n and its prompts) "
                                "by how their sequences ended: error if any did, else abort, else length, else stop",
                                ["finish_reason"], registry=r)
        self.rejected = Counter("lmforge_rejected_requests", "client requests refused on submission, by HTTP status "
                                "(429: the queue is full; 400: the engine refused a prompt)", ["status"], registry=r)
        buckets = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
        self.ttft = Histogram("lmforge_time_to_first_token_seconds", "time from a client request's arrival to the first "
                              "token of any of its sequences", buckets=buckets, registry=r)
        self.latency = Histogram("lmforge_request_latency_seconds", "time from a client request's arrival to the last token "
                                 "of its last sequence (not for cancelled requests)", buckets=buckets, registry=r)
        self.step_time = Histogram("lmforge_step_seconds", "time of one engine step", buckets=buckets, registry=r)


_WORSE = {"stop": 0, "length": 1, "abort": 2, "error": 3}  # a client request ends as the worst of its sequences


@dataclass
class _Client:
    """One client request, whose sequences the metrics count together."""

    arrived: float
    prompt_tokens: int
    left: int  # sequences not finished
    first: float | None = None
    reason: str = "stop"


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    tag: int
    client: _Client
    turn: int = 0
    held: list = field(default_factory=list)


class _Outbox:
    """Events on their way to one event loop. At most one hand-over is pending: while the loop has
    not taken the last batch, later steps add to it, so a busy loop takes several steps' tokens at
    once (and its handlers write them as one chunk) instead of falling further behind."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._items: list[tuple[asyncio.Queue, object]] = []
        self._lock = threading.Lock()
        self._pending = False

    def put(self, items: list[tuple[asyncio.Queue, object]]) -> None:
        with self._lock:
            self._items.extend(items)
            if self._pending:
                return
            self._pending = True
        try:
            self.loop.call_soon_threadsafe(self._hand_over)
        except RuntimeError:  # that handler's event loop is gone: drop what it would have taken
            with self._lock:
                self._items, self._pending = [], False

    def _hand_over(self) -> None:
        with self._lock:
            items, self._items, self._pending = self._items, [], False
        for q, item in items:
            q.put_nowait(item)


class EngineRunner:
    """Owns an `Engine` and the thread that steps it.

    With more than `writes_per_step` streams running, each stream's tokens go out every k-th
    step, k = ceil(streams / writes_per_step), the streams taking turns (a first token and a last
    one go out at once; 0 sends every token at once). The event loop then writes about
    `writes_per_step` chunks per step whatever the load. Writing one chunk per token per stream
    kept the event loop's thread busy, and the engine thread, which needs the GIL between every
    two tensor ops, spent more time waiting for it than in the model (SGLang's `stream_interval`
    makes the same trade, at a fixed interval).
    """

    def __init__(self, engine: Engine, writes_per_step: int = 8) -> None:
        self.engine = engine
        self.writes_per_step = writes_per_step
        self._steps = 0
        self._turns = itertools.count()
        self.metrics = Metrics(engine)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._adding = 0  # requests in the inbox on their way to the engine's queue (aborts do not count)
        self._adding_lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._streams: dict[str, _Stream] = {}
        self._outboxes: dict[asyncio.AbstractEventLoop, _Outbox] = {}
        self._window: tuple[float, int] = (time.perf_counter(), 0)
        self._thread = threading.Thread(target=self._run, name="lmforge-engine", daemon=True)
        self._thread.start()

    def submit(self, requests: list[tuple[list[int], SamplingParams, int]], queue: asyncio.Queue,
               prompt_tokens: int | None = None) -> list[str]:
        """Queue one client request's sequences, (prompt, params, tag) each (its prompts x n), all or
        none: UserError / QueueFull raise here before any is queued. Their events arrive on `queue`
        as (tag, Event). The queue bound refuses a client request when `max_waiting` sequences are
        waiting already beyond the free slots (`Engine.unseated`); one that is let in brings all its
        sequences (else `n` above the bound could never be served, and its first sequence would count
        against its second). `prompt_tokens`:
        what the metrics count for the request's prompts (default: every sequence's prompt)."""
        reqs = [self.engine.make_request(prompt, params, request_id=uuid.uuid4().hex) for prompt, params, _ in requests]
        bound = self.engine.max_waiting
        with self._adding_lock:
            if bound is not None and self.engine.unseated(arriving=self._adding) >= bound:
                raise QueueFull(f"{bound} sequences are waiting already (the queue's bound); try again later")
            self._adding += len(reqs)  # nothing below can fail before the inbox has them
        loop = asyncio.get_running_loop()
        client = _Client(time.perf_counter(), sum(len(p) for p, _, _ in requests) if prompt_tokens is None else prompt_tokens,
                         len(reqs))
        for req, (_, _, tag) in zip(reqs, requests):
            self._streams[req.id] = _Stream(loop, queue, tag, client, next(self._turns))
            self._inbox.put(("add", req))
        self._wake.set()
        return [req.id for req in reqs]

    def abort(self, request_id: str) -> None:
        """Free a request's slot at the next step (a no-op once it has finished)."""
        if request_id in self._streams:
            self._inbox.put(("abort", request_id))
            self._wake.set()

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=5)

    def _drain(self) -> None:
        while True:
            try:
                kind, item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                self.engine.enqueue(item)
                with self._adding_lock:
                    self._adding -= 1
            elif self.engine.abort(item) is not None and (stream := self._streams.pop(item, None)) is not None:
                self._ended(stream.client, "abort", time.perf_counter())

    def _run(self) -> None:
        while not self._stop.is_set():
            self._drain()
            if not self.engine.has_work:
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                self._tick(0)
                continue
            t0 = time.perf_counter()
            try:
                events = self.engine.step()
            except Exception:  # a bug must not kill the thread and hang every client: fail what is in flight
                log.exception("engine step failed; ending the requests in flight with an error")
                events = [Event(r, None, "", finished=True) for r in self.engine.abort_all("error")]
            self.metrics.step_time.observe(time.perf_counter() - t0)
            self._deliver(events)

    def _deliver(self, events: list[Event]) -> None:
        now = time.perf_counter()
        n = 0
        self._steps += 1
        every = -(-len(self._streams) // self.writes_per_step) if self.writes_per_step else 1
        by_loop: dict[asyncio.AbstractEventLoop, list] = defaultdict(list)
        for ev in events:
            n += ev.token is not None
            stream = self._streams.pop(ev.request.id, None) if ev.finished else self._streams.get(ev.request.id)
            if stream is None:
                continue
            client = stream.client
            # its prompt is in (a first token, or the end of one that only scores its prompt): count it (usage counts it too)
            if client.first is None and (ev.token is not None or ev.request.finish_reason == "length"):
                client.first = now
                self.metrics.ttft.observe(now - client.arrived)
                self.metrics.prompt.inc(client.prompt_tokens)
            if ev.finished:
                self._ended(client, ev.request.finish_reason, now)
            stream.held.append((stream.queue, (stream.tag, ev)))
            if ev.finished or len(ev.request.output) == 1 or (self._steps + stream.turn) % every == 0:
                by_loop[stream.loop].extend(stream.held)
                stream.held = []
        for loop, items in by_loop.items():
            outbox = self._outboxes.get(loop)
            if outbox is None:
                outbox = self._outboxes[loop] = _Outbox(loop)
            outbox.put(items)
        self.metrics.generated.inc(n)
        self._tick(n)

    def _ended(self, client: _Client, reason: str, now: float) -> None:
        """One of `client`'s sequences ended with `reason`; the last one counts the request."""
        client.left -= 1
        client.reason = max(client.reason, reason, key=lambda r: _WORSE.get(r, 0))
        if client.left == 0:
            self.metrics.requests.labels(client.reason).inc()
            if client.reason != "abort":
                self.metrics.latency.observe(now - client.arrived)

    def _tick(self, n: int) -> None:
        start, count = self._window
        now = time.perf_counter()
        count += n
        if now - start >= 1.0:
            self.metrics.tokens_per_second.set(count / (now - start))
            start, count = now, 0
        self._window = (start, count)
