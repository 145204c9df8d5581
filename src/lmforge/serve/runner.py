"""The bridge between asyncio request handlers and the engine: the engine steps on one thread,
each request reads its events from an asyncio queue.

    handler ──submit()──> [lock] Engine.add ─┐                    ┌──> asyncio.Queue (per request) ──> handler
                                             └─> engine thread: step() ─> events ─ call_soon_threadsafe
    handler ──abort() (client gone)──> [lock] Engine.abort: the slot is free at the next step
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from lmforge.infer import Engine, Event, SamplingParams

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


class EngineRunner:
    """Owns an `Engine` and the thread that steps it."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.metrics = Metrics(engine)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._streams: dict[str, _Stream] = {}
        self._window: tuple[float, int] = (time.perf_counter(), 0)
        self._thread = threading.Thread(target=self._run, name="lmforge-engine", daemon=True)
        self._thread.start()

    def submit(self, prompt: list[int], params: SamplingParams, queue: asyncio.Queue, tag: int = 0) -> str:
        """Queue a request (UserError / QueueFull propagate); its events arrive on `queue` as (tag, Event)."""
        loop = asyncio.get_running_loop()
        with self._lock:
            req = self.engine.add(prompt, params)
            self._streams[req.id] = _Stream(loop, queue, tag, time.perf_counter())
        self.metrics.prompt.inc(len(prompt))
        self._wake.set()
        return req.id

    def abort(self, request_id: str) -> None:
        with self._lock:
            req = self.engine.abort(request_id)
            stream = self._streams.pop(request_id, None)
        if req is not None and stream is not None:
            self.metrics.requests.labels("abort").inc()

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                busy = self.engine.has_work
                if busy:
                    t0 = time.perf_counter()
                    try:
                        events = self.engine.step()
                    except Exception:  # a bug must not kill the thread and hang every client: fail what is in flight
                        log.exception("engine step failed; ending the requests in flight with an error")
                        events = [Event(r, None, "", finished=True) for r in self.engine.abort_all("error")]
                    self.metrics.step_time.observe(time.perf_counter() - t0)
                    routes = [(ev, self._streams.get(ev.request.id)) for ev in events]
                    for ev in events:
                        if ev.finished:
                            self._streams.pop(ev.request.id, None)
            if not busy:
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                self._tick(0)
                continue
            self._deliver(routes)

    def _deliver(self, routes: list[tuple[Event, _Stream | None]]) -> None:
        now = time.perf_counter()
        n = 0
        for ev, stream in routes:
            if ev.token is not None:
                n += 1
            if stream is None:
                continue
            if stream.first is None:
                stream.first = now
                self.metrics.ttft.observe(now - stream.arrived)
            if ev.finished:
                self.metrics.latency.observe(now - stream.arrived)
                self.metrics.requests.labels(ev.request.finish_reason).inc()
            try:
                stream.loop.call_soon_threadsafe(stream.queue.put_nowait, (stream.tag, ev))
            except RuntimeError:  # the handler's event loop is gone
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
