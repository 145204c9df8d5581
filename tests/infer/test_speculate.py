"""Speculative decoding by prompt lookup: drafts are checked in the decode step, so the output
is exactly the model's own."""

import pytest

from lmforge.infer import Engine, SamplingConfig, SamplingParams, generate_tokens, load
from lmforge.infer.speculate import NgramDrafter

from conftest import varied_transformer


def greedy_alone(model, prompt, n):
    return list(generate_tokens(model, prompt, n, SamplingConfig(temperature=0)))


def test_drafts_follow_the_latest_occurrence_of_the_longest_suffix():
    d = NgramDrafter([1, 2, 3, 4, 9, 2, 3, 5, 6, 7, 2, 3], max_n=3)
    assert d.draft(3) == [5, 6, 7]  # "2 3" last occurred before 5; "3 2 3" never did... "7 2 3" neither
    d.extend([5])
    assert d.draft(2) == [6, 7]  # "2 3 5" occurred once
    assert NgramDrafter([1, 2, 3]).draft(4) == []  # no suffix occurred before
    assert NgramDrafter([4, 4, 4]).draft(4) == [4, 4, 4, 4]  # a loop goes on
    assert NgramDrafter([7, 1, 2, 1, 2]).draft(5) == [1, 2, 1, 2, 1]
    assert NgramDrafter([1, 2, 8, 2], max_n=2, min_n=2).draft(2) == []  # a 1-gram match is not enough


@pytest.fixture(scope="module")
def model():
    return varied_transformer(5, context_length=128)


def test_speculative_greedy_equals_plain_decoding_and_accepts_drafts(model):
    """A random model repeats itself, so drafts are taken; greedy rows give what they give without
    speculation, and penalised rows (which never speculate) decode beside them."""
    prompts = [[1, 2, 3, 1, 2, 3, 1, 2], [9] * 11, [4, 8, 15, 16, 23, 42, 4, 8], [7, 7, 1], [30, 31, 32, 30, 31]]
    params = [SamplingParams(temperature=0, max_tokens=40), SamplingParams(temperature=0, max_tokens=33, logprobs=2),
              SamplingParams(temperature=0.9, max_tokens=20, seed=4), SamplingParams(temperature=0, max_tokens=25, frequency_penalty=0.5),
              SamplingParams(temperature=0, max_tokens=31)]
    plain = Engine(model, max_batch=3, prefill_chunk=4).generate(prompts, params)
    engine = Engine(model, max_batch=3, prefill_chunk=4, speculate=4)
    fast = engine.generate(prompts, params)
    greedy = [0, 1, 3, 4]
    assert [fast[i].output for i in greedy] == [plain[i].output for i in greedy]
    # The seeded sampled row speculates too: it draws differently, but the same alone as in the batch.
    assert fast[2].output == Engine(model, max_batch=1, speculate=4).generate([prompts[2]], params[2])[0].output
    assert [r.finish_reason for r in fast] == [r.finish_reason for r in plain] == ["length"] * 5
    assert [lp["token"] for lp in fast[1].logprobs] == fast[1].output
    for a, b in zip(fast[1].logprobs, plain[1].logprobs):
        assert a["top"][0][0] == b["top"][0][0] and a["logprob"] == pytest.approx(b["logprob"], abs=1e-4)
    assert fast[0].output == greedy_alone(model, prompts[0], 40)
    assert 0 < engine.accepted <= engine.drafted


def test_a_penalised_request_whose_drafts_would_be_taken_decodes_as_without_speculation(model):
    """A frequency penalty changes with every token, so drafts checked with the counts of the step they
    start in would be scored with stale counts. Here the bias makes 9 the greedy choice until its
    penalty outweighs it: drafts of 9s would be accepted past that point."""
    params = SamplingParams(temperature=0, max_tokens=30, frequency_penalty=2.0, logit_bias={9: 30.0})
    plain = Engine(model, max_batch=1).generate([[9] * 11], params)[0].output
    fast = Engine(model, max_batch=1, speculate=4).generate([[9] * 11], params)[0].output
    assert fast == plain and 1 < plain.count(9) < 30


def test_a_seeded_request_drafts_alike_beside_a_request_at_the_end_of_the_cache(model):
    """A neighbour a few positions from the end of the cache cannot shorten another request's
    drafts (that would change how a sampled one draws): rows whose padding would run past the
    cache decode in a forward of their own."""
    near_end = [(7 * i) % 100 for i in range(110)]  # 110 + 18 tokens: its last positions sit under the other row's padding
    greedy = SamplingParams(temperature=0, max_tokens=18)
    for seed in range(6):
        p = SamplingParams(temperature=0.9, max_tokens=40, seed=seed)
        alone = Engine(model, max_batch=2, speculate=4, max_seq_len=128).generate([[1, 2, 3, 1, 2, 3, 1, 2]], p)[0].output
        both = Engine(model, max_batch=2, speculate=4, max_seq_len=128).generate([[1, 2, 3, 1, 2, 3, 1, 2], near_end], [p, greedy])
        assert both[0].output == alone, seed
    assert both[1].output == Engine(model, max_batch=1).generate([near_end], greedy)[0].output


def test_a_stop_token_inside_an_accepted_draft_ends_the_request_there(model):
    prompt = [1, 2, 3, 1, 2, 3, 1, 2]
    ref = Engine(model, max_batch=1).generate([prompt], SamplingParams(temperature=0, max_tokens=30))[0].output
    stop = ref[12]
    cut = ref[: ref.index(stop) + 1]
    for speculate in (0, 6):
        req = Engine(model, max_batch=1, speculate=speculate).generate(
            [prompt], SamplingParams(temperature=0, max_tokens=30, stop_token_ids=(stop,)))[0]
        assert (req.output, req.finish_reason) == (cut, "stop")


def test_speculation_keeps_the_cache_right_for_prefix_reuse_and_the_context_end(model):
    """After speculative steps (rejected drafts write keys past the sequence) a freed slot still
    holds the right keys for the next turn; a request that ends at the cache's last position drafts less."""
    engine = Engine(model, max_batch=2, speculate=5, max_seq_len=64)
    first = engine.generate([[5, 6, 7, 5, 6, 7, 5]], SamplingParams(temperature=0, max_tokens=20))[0]
    turn = first.prompt + first.output + [11, 12]
    second = engine.generate([turn], SamplingParams(temperature=0, max_tokens=64 - len(turn)))[0]
    assert engine.reused_tokens == len(first.prompt) + len(first.output) - 1
    assert second.output == greedy_alone(model, turn, 64 - len(turn)) and len(turn) + len(second.output) == 64


def test_compiled_engine_checks_drafts_in_its_compiled_verify_step(model):
    """A compiled engine feeds every slot speculate + 1 tokens through its compiled verify step
    (greedy output as without drafts), and near the end of the cache, where that many would not
    fit, an eager step (a 61-token prompt in a 64-position cache)."""
    params = SamplingParams(temperature=0, max_tokens=24)
    prompts = [[1, 2, 3, 1, 2, 3, 1], [9, 8, 9, 8], [(5 * i) % 50 for i in range(40)]]
    plain = Engine(model, max_batch=2, max_seq_len=64).generate(prompts, params)
    engine = Engine(model, max_batch=2, max_seq_len=64, compile=True, speculate=3)
    verify, calls = engine._verify, []
    engine._verify = lambda *a: calls.append(a[1].shape) or verify(*a)
    assert [r.output for r in engine.generate(prompts, params)] == [r.output for r in plain] and engine.accepted > 0
    assert calls and set(calls) == {(2, 4)}  # all slots, the newest token and 3 draft positions each
    near_end = [78, 91, 54] + [1, 2, 3, 4, 5] * 11 + [1, 2, 2]  # the model goes on with 78 91 54: a draft
    seen, drafted = len(calls), engine.drafted
    req = engine.generate([near_end], SamplingParams(temperature=0, max_tokens=3))[0]
    assert req.output == Engine(model, max_batch=1, max_seq_len=64).generate([near_end], req.params)[0].output
    assert engine.drafted > drafted and len(calls) == seen  # position 61 + 4 tokens would pass the cache's 64
    # A compiled verify step beside a slot whose prefill has reached past 64 - 4 positions: that slot
    # writes in the put-back window; both requests give what they give alone.
    engine = Engine(model, max_batch=2, max_seq_len=64, prefill_chunk=61, compile=True, speculate=3)
    long = [(7 * i) % 50 + 1 for i in range(63)]
    alone = Engine(model, max_batch=1, max_seq_len=64).generate([long], SamplingParams(temperature=0, max_tokens=1))[0].output
    for k in range(1, 8):  # the long prompt joins after k steps of the first: at some k beside a drafting step
        first = engine.add(prompts[0], params)
        for _ in range(k):
            engine.step()
        second = engine.add(long, SamplingParams(temperature=0, max_tokens=1))
        while engine.has_work:
            engine.step()
        assert (first.output, second.output) == (plain[0].output, alone), k


def test_trained_model_text_with_speculation(trained_run):
    lm = load(trained_run.out, device="cpu")
    prompts = [lm.tokenizer.encode(p) for p in ["ROMEO:", "JULIET:\nO", "First Citizen:\nWe are"]]
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    plain = Engine(lm.model, lm.tokenizer, max_batch=3).generate(prompts, params)
    engine = Engine(lm.model, lm.tokenizer, max_batch=3, speculate=4)
    assert [r.text for r in engine.generate(prompts, params)] == [r.text for r in plain]
    assert engine.accepted > sum(len(r.output) for r in plain) / 2  # its text repeats: most tokens come from drafts


def test_bad_speculate_is_a_user_error(model):
    from lmforge.utils.errors import UserError

    with pytest.raises(UserError, match="speculate"):
        Engine(model, speculate=-1)
