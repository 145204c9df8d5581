"""The engine thread's hand-over to asyncio: under load a stream's tokens go out in groups."""

import asyncio

import pytest

from lmforge.infer import Engine, QueueFull, SamplingConfig, SamplingParams, generate_tokens
from lmforge.serve import EngineRunner
from lmforge.utils.errors import UserError

PROMPTS = [[1, 2, 3], [9] * 11, [4, 8, 15, 16, 23, 42], [7], [30, 31], [5, 5, 6], [20, 21, 22, 23], [11, 12]]


def test_streams_take_turns_under_load_and_lose_nothing(varied_model):
    """8 streams, 2 writes per step: each stream gets its tokens every 4th step, all of them, in order."""
    runner = EngineRunner(Engine(varied_model, max_batch=8), writes_per_step=2)

    async def main():
        queue: asyncio.Queue = asyncio.Queue()
        for i, p in enumerate(PROMPTS):
            runner.submit([(p, SamplingParams(temperature=0, max_tokens=12), i)], queue)
        got: dict[int, list[list[int]]] = {i: [] for i in range(len(PROMPTS))}
        done = 0
        while done < len(PROMPTS):
            batch = [await queue.get()]
            while not queue.empty():
                batch.append(queue.get_nowait())
            groups: dict[int, list[int]] = {}
            for tag, ev in batch:
                groups.setdefault(tag, []).append(ev.token)
                done += ev.finished
            for tag, tokens in groups.items():
                got[tag].append(tokens)
        return got

    try:
        got = asyncio.run(main())
    finally:
        runner.close()
    for i, p in enumerate(PROMPTS):
        alone = list(generate_tokens(varied_model, p, 12, SamplingConfig(temperature=0)))
        assert [t for group in got[i] for t in group] == alone
    assert max(len(group) for groups in got.values() for group in groups) > 1


def test_the_queue_bound_counts_requests_not_aborts(varied_model):
    """Aborts on their way to the engine (clients gone) take no place in the queue of `max_waiting`."""
    runner = EngineRunner(Engine(varied_model, max_batch=1, max_waiting=2))
    runner.close()  # the engine thread stops: what is submitted now stays in the inbox, as on a busy step

    async def main():
        queue: asyncio.Queue = asyncio.Queue()
        [first] = runner.submit([([1, 2], SamplingParams(max_tokens=4), 0)], queue)  # the free slot's
        for _ in range(5):
            runner.abort(first)
        runner.submit([([3], SamplingParams(max_tokens=4), 0)], queue)
        runner.submit([([4], SamplingParams(max_tokens=4), 0)], queue)
        with pytest.raises(QueueFull):
            runner.submit([([5], SamplingParams(max_tokens=4), 0)], queue)

    asyncio.run(main())


def test_an_idle_server_takes_a_request_for_each_free_slot_and_then_its_queue(varied_model):
    """Seen in review: two requests at once on an idle server with 2 slots and a queue of 1 got a 429, since
    sequences on their way to free slots counted as waiting. Now: 2 seated, 1 waiting, then refused."""
    runner = EngineRunner(Engine(varied_model, max_batch=2, max_waiting=1))
    runner.close()  # nothing reaches the engine between the submits: as when they arrive at the same moment

    async def main():
        queue: asyncio.Queue = asyncio.Queue()
        for prompt in ([1], [2], [3]):
            runner.submit([(prompt, SamplingParams(max_tokens=4), 0)], queue)
        with pytest.raises(QueueFull):
            runner.submit([([4], SamplingParams(max_tokens=4), 0)], queue)

    asyncio.run(main())



def test_a_request_with_several_sequences_is_let_in_whole(varied_model):
    """n = 2 under a bound of 1 on an idle server: both sequences go in together (the first one had
    counted against the second: 429 with nothing waiting); the next request waits its turn; a
    request one of whose prompts is too long queues none of its sequences."""
    runner = EngineRunner(Engine(varied_model, max_batch=1, max_waiting=1))
    runner.close()  # nothing reaches the engine: the inbox is the queue

    async def main():
        queue: asyncio.Queue = asyncio.Queue()
        two = [([1, 2], SamplingParams(max_tokens=4, seed=s), s) for s in range(2)]
        assert len(runner.submit(two, queue)) == 2
        with pytest.raises(QueueFull):
            runner.submit([([3], SamplingParams(max_tokens=4), 0)], queue)

    asyncio.run(main())
    fresh = EngineRunner(Engine(varied_model, max_batch=1, max_waiting=1))
    fresh.close()

    async def too_long():
        queue: asyncio.Queue = asyncio.Queue()
        with pytest.raises(UserError, match="context"):
            fresh.submit([([1], SamplingParams(max_tokens=4), 0), ([1] * 500, SamplingParams(max_tokens=4), 1)], queue)
        assert fresh._adding == 0 and not fresh._streams

    asyncio.run(too_long())


def test_a_request_cancelled_while_waiting_counts_as_an_abort_and_no_prompt(varied_model):
    """One slot: the second client request (n = 2) waits, and is cancelled there. The metrics count
    two client requests, the first one's prompt only, and its tokens."""
    runner = EngineRunner(Engine(varied_model, max_batch=1))
    metrics = runner.metrics

    async def main():
        queue: asyncio.Queue = asyncio.Queue()
        runner.submit([([1, 2, 3], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True), 0)], queue)
        ids = runner.submit([([4, 5], SamplingParams(max_tokens=4, seed=s), s) for s in range(2)], queue)
        for r in ids:
            runner.abort(r)
        while not (await queue.get())[1].finished:
            pass

    try:
        asyncio.run(main())
    finally:
        runner.close()
    value = lambda counter, *labels: (counter.labels(*labels) if labels else counter)._value.get()
    assert value(metrics.requests, "length") == 1 and value(metrics.requests, "abort") == 1
    assert value(metrics.prompt) == 3 and value(metrics.generated) == 30
    assert metrics.ttft._sum.get() > 0 and sum(b.get() for b in metrics.ttft._buckets) == 1
