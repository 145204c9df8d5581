"""The bridge between asyncio request handlers and the engine: the engine steps on its own
thread, each request reads its events from an asyncio queue, and nothing holds a lock across a step.

    handler ─ submit(): check, then inbox.put(add) ─┐
    handler ─ abort() (client gone): inbox.put ─────┤
                                                    └─> engine thread: drain inbox ─> step() ─> events
                                                          ─> one call_soon_threadsafe per event loop ─> asyncio.Queue (per request)
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from lmforge.infer import Engine, Event, QueueFull, SamplingParams

log = logging.getLogger("lmforge.serve")


class Metrics:
    """Prometheus metrics of one server, in their own registry (several apps may live in one process)."""

    def __init__(self, engine: Engine) -> None:
        self.registry = r = CollectorRegistry()
        Gauge("lmforge_queue_length", "requests waiting for a slot", registry=r).set_function(lambda: len(engine.waiting))
        Gauge("lmforge_running_sequences", "sequences holding a KV-cache slot", registry=r).set_function(lambda: engine.running)
        Gauge("lmforge_slots", "KV-cache slots (the most sequences decoded at once)", registry=r).set(engine.max_batch)
        self.tokens_per_second = Gauge("lmforge_tokens_per_second", "generated tokens per second over the last second", registry=r)
        self.generated = Counter("lmforge_generated_tokens", "generated tokens", registry=r)
        self.prompt = Counter("lmforge_prompt_tokens", "prompt tokens admitted", registry=r)
        self.requests = Counter("lmforge_requests", "finished requests by reason", ["finish_reason"], registry=r)
        self.rejected = Counter("lmforge_rejected_requests", "requests refused, by HTTP status", ["status"], registry=r)
        buckets = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
        self.ttft = Histogram("lmforge_time_to_first_token_seconds", "time from arrival to the first token", buckets=buckets, registry=r)
        self.latency = Histogram("lmforge_request_latency_seconds", "time from arrival to the last token", buckets=buckets, registry=r)
        self.step_time = Histogram("lmforge_step_seconds", "time of one engine step", buckets=buckets, registry=r)


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    tag: int
    arrived: float
    first: float | None = None


def _put_all(items: list[tuple[asyncio.Queue, object]]) -> None:
    for q, item in items:
        q.put_nowait(item)


class EngineRunner:
    """Owns an `Engine` and the thread that steps it."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.metrics = Metrics(engine)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._streams: dict[str, _Stream] = {}
        self._window: tuple[float, int] = (time.perf_counter(), 0)
        self._thread = threading.Thread(target=self._run, name="lmforge-engine", daemon=True)
        self._thread.start()

    def submit(self, prompt: list[int], params: SamplingParams, queue: asyncio.Queue, tag: int = 0) -> str:
        """Queue a request (UserError / QueueFull raise here); its events arrive on `queue` as (tag, Event)."""
        req = self.engine.make_request(prompt, params, request_id=uuid.uuid4().hex)
        bound = self.engine.max_waiting
        if bound is not None and len(self.engine.waiting) + self._inbox.qsize() >= bound:
            raise QueueFull(f"{bound} requests are waiting already; try again later")
        self._streams[req.id] = _Stream(asyncio.get_running_loop(), queue, tag, time.perf_counter())
        self.metrics.prompt.inc(len(prompt))
        self._inbox.put(("add", req))
        self._wake.set()
        return req.id

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
            elif self.engine.abort(item) is not None:
                self._streams.pop(item, None)
                self.metrics.requests.labels("abort").inc()

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
        by_loop: dict[asyncio.AbstractEventLoop, list] = defaultdict(list)
        for ev in events:
            n += ev.token is not None
            stream = self._streams.pop(ev.request.id, None) if ev.finished else self._streams.get(ev.request.id)
            if stream is None:
                continue
            if stream.first is None:
                stream.first = now
                self.metrics.ttft.observe(now - stream.arrived)
            if ev.finished:
                self.metrics.latency.observe(now - stream.arrived)
                self.metrics.requests.labels(ev.request.finish_reason).inc()
            by_loop[stream.loop].append((stream.queue, (stream.tag, ev)))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # that handler's event loop is gone
                pass
        self.metrics.generated.inc(n)
        self._tick(n)

    def _tick(self, n: int) -> None:
        start, count = self._window
        now = time.perf_counter()
        count += n
        if now - start >= 1.0:
            self.metrics.tokens_per_second.set(count / (now - start))
            start, count = now, 0
        self._window = (start, count)
