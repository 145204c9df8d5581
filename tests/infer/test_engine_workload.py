"""A random workload through the engine, each request checked against running it alone.

Requests arrive over time, share prompt prefixes, continue earlier ones (chat turns), mix greedy,
seeded sampling, penalties with logit bias, stop tokens and logprobs, and some are aborted; with
prefix reuse and speculation on and off. Every request that ran to its end must give the tokens
it gives alone in a fresh engine without either (a sampled request: alone with the same
speculation, which draws its random numbers differently), and every freed slot must hold the
keys and values of the tokens it says it keeps.
"""

import random

import pytest
import torch

from lmforge.infer import Engine, SamplingParams

from conftest import varied_transformer

CONTEXT = 96


@pytest.fixture(scope="module")
def model():
    return varied_transformer(7, context_length=CONTEXT)


def workload(rng: random.Random) -> list[tuple[list[int], SamplingParams]]:
    bases = [[rng.randrange(100) for _ in range(rng.randrange(10, 40))] for _ in range(3)]
    out = []
    for i in range(30):
        base = rng.choice(bases)
        prompt = base[: rng.randrange(1, len(base) + 1)] + [rng.randrange(100) for _ in range(rng.randrange(0, 6))]
        n = rng.randrange(1, min(30, CONTEXT - len(prompt)))
        kind = rng.random()
        if kind < 0.5:
            p = SamplingParams(temperature=0, max_tokens=n)
        elif kind < 0.7:
            p = SamplingParams(temperature=0.8, top_k=20, max_tokens=n, seed=i)
        elif kind < 0.85:
            p = SamplingParams(temperature=0, max_tokens=n, repetition_penalty=1.3, logit_bias={5: 2.0})
        else:
            p = SamplingParams(temperature=0, max_tokens=n, stop_token_ids=(rng.randrange(100),), logprobs=1)
        out.append((prompt, p))
    return out


@pytest.mark.parametrize("seed", [0, 5])
@pytest.mark.parametrize("speculate, prefix_cache", [(0, True), (4, True), (4, False)])
def test_a_random_workload_gives_every_request_its_tokens_alone(model, seed, speculate, prefix_cache):
    rng = random.Random(seed)
    pending = workload(rng)
    engine = Engine(model, max_batch=4, prefill_chunk=8, max_seq_len=CONTEXT, prefix_cache=prefix_cache, speculate=speculate)
    reqs = []
    while pending or engine.has_work:
        for _ in range(rng.randrange(0, 3)):  # arrivals between steps
            if pending:
                prompt, p = pending.pop(0)
                done = [r for r in reqs if r.finished]
                if done and rng.random() < 0.3:  # the next turn of a finished request
                    prev = rng.choice(done)
                    if len(prev.prompt) + len(prev.output) + 2 + p.max_tokens <= CONTEXT:
                        prompt = prev.prompt + prev.output + [1, 2]
                reqs.append(engine.add(prompt, p))
        if engine.has_work:
            engine.step()
            if rng.random() < 0.05 and engine.running:
                engine.abort(next(r for r in engine.slots if r is not None).id)
    finished = [r for r in reqs if r.finish_reason != "abort"]
    assert len(finished) >= 20
    for r in finished:
        alone = Engine(model, max_batch=1, prefix_cache=False, speculate=0 if r.params.greedy else speculate)
        assert r.output == alone.generate([r.prompt], r.params)[0].output, r.params
    assert (engine.reused_tokens > 0) == prefix_cache and (engine.drafted > 0) == (speculate > 0)
    for s, kept in enumerate(engine.kept):
        if kept:
            alone = model.new_cache(1, CONTEXT)
            with torch.no_grad():
                model(torch.tensor([kept]), cache=alone)
            for t, ref in zip(engine.cache.k + engine.cache.v, alone.k + alone.v):
                torch.testing.assert_close(t[s, :, : len(kept)], ref[0, :, : len(kept)], atol=1e-4, rtol=1e-4)
