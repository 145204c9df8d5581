"""The batched sampler against naive one-row-at-a-time references."""

import math

import pytest
import torch

from lmforge.infer import sampling
from lmforge.infer.sampling import SamplingParams, apply_penalties, draw, filter_logits, sample_rows, speculative_sample
from lmforge.utils.errors import UserError


def naive_penalties(logits, generated, prompt, rep, presence, frequency):
    out = list(logits)
    for t in range(len(out)):
        if t in generated or t in prompt:
            out[t] = out[t] / rep if out[t] > 0 else out[t] * rep
        c = generated.count(t)
        out[t] -= frequency * c + (presence if c else 0.0)
    return out


def naive_filter(logits, top_k, top_p, min_p):
    V = len(logits)
    ranked = sorted(range(V), key=lambda t: -logits[t])
    kept = ranked if top_k == 0 else [t for t in ranked if logits[t] >= logits[ranked[min(top_k, V) - 1]]]
    z = sum(math.exp(logits[t]) for t in kept)
    probs = {t: math.exp(logits[t]) / z for t in kept}
    nucleus, mass = [], 0.0
    for t in kept:
        if top_p < 1.0 and mass >= top_p:  # the tokens above already hold top_p
            break
        nucleus.append(t)
        mass += probs[t]
    top = probs[kept[0]]
    return {t for t in nucleus if probs[t] >= min_p * top}


def test_penalties_match_the_naive_formula():
    torch.manual_seed(0)
    logits = torch.randn(3, 12)
    rows = [([1, 1, 4], [2, 3], 1.3, 0.5, 0.2), ([], [0], 0.8, 0.0, 1.0), ([7, 7, 7, 2], [], 1.0, -0.5, 0.3)]
    counts, prompt_mask = torch.zeros(3, 12), torch.zeros(3, 12, dtype=torch.bool)
    for b, (gen, prompt, *_) in enumerate(rows):
        for t in gen:
            counts[b, t] += 1
        prompt_mask[b, prompt] = True
    col = lambda i: torch.tensor([r[i] for r in rows])
    got = apply_penalties(logits, counts, prompt_mask, col(2), col(3), col(4))
    for b, (gen, prompt, rep, pres, freq) in enumerate(rows):
        expected = naive_penalties(logits[b].tolist(), gen, prompt, rep, pres, freq)
        torch.testing.assert_close(got[b], torch.tensor(expected))


SETTINGS = [(0, 1.0, 0.0), (3, 1.0, 0.0), (0, 0.6, 0.0), (0, 1.0, 0.2), (5, 0.8, 0.05), (1, 0.3, 0.9), (40, 0.95, 0.0),
            (0, 0.99, 0.0), (0, 1.0, 0.001), (12, 0.9, 0.0)]


@pytest.mark.parametrize("candidates", [1024, 8])
@pytest.mark.parametrize("seed", range(5))
def test_filters_match_the_naive_reference(seed, candidates, monkeypatch):
    """With 8 candidates on 60 tokens, rows whose kept prefix fits in the ranked tokens take the
    top-k path and the others the full sort: either way the naive reference's set. Scales 0.3 to
    4 give flat and peaked rows, and a copy of row 1 with ties at its 3rd logit tests ties."""
    monkeypatch.setattr(sampling, "CANDIDATES", candidates)
    torch.manual_seed(seed)
    V = 60
    logits = torch.randn(len(SETTINGS), V) * torch.linspace(0.3, 4.0, len(SETTINGS))[:, None]
    logits[1, torch.randperm(V)[:4]] = logits[1].sort(descending=True).values[2]  # 5 tokens tie for 3rd
    for settings, rows in ((SETTINGS, logits), (SETTINGS[::-1], logits.flip(0))):
        col = lambda i, dtype: torch.tensor([s[i] for s in settings], dtype=dtype)
        got = filter_logits(rows, col(0, torch.long), col(1, torch.float32), col(2, torch.float32))
        for b, (k, p, m) in enumerate(settings):
            kept = {t for t in range(V) if got[b, t] > float("-inf")}
            assert kept == naive_filter(rows[b].tolist(), k, p, m), (k, p, m)
            assert torch.equal(got[b][list(kept)], rows[b][list(kept)])  # kept logits are untouched


@pytest.mark.parametrize("candidates", [1024, 2])
def test_top_p_keeps_what_transformers_keeps_at_ties_and_boundaries(candidates, monkeypatch):
    """A token goes once the tokens above it hold >= top_p (TopPLogitsWarper). With 4 or 8 tied
    tokens the masses are exact in binary, so top_p 0.5 of 4 ties keeps 2, not 3. Two candidates
    rank too few for the nucleus of 8 ties: that path must agree too."""
    from transformers.generation.logits_process import TopPLogitsWarper

    monkeypatch.setattr(sampling, "CANDIDATES", candidates)
    torch.manual_seed(0)
    cases = []
    for n, top_ps in ((4, [0.25, 0.5, 0.75, 0.9]), (8, [0.125, 0.375, 0.5, 0.625, 0.99])):
        x = torch.full((1, 2000), -1e4)
        x[0, torch.randperm(2000)[:n]] = 5.0
        cases += [(x, p) for p in top_ps]
    x = torch.randn(1, 2000) * 3.0
    cases += [(x, p) for p in (0.1, 0.5, 0.9, 0.999)]
    for x, p in cases:
        ours = filter_logits(x, torch.tensor([0]), torch.tensor([p]), torch.tensor([0.0]))[0].isfinite()
        theirs = TopPLogitsWarper(p)(None, x.clone())[0].isfinite()
        # Tied tokens may be kept in another order; the kept count and logits must match.
        assert int(ours.sum()) == int(theirs.sum()), p
        assert torch.equal(x[0][ours].sort().values, x[0][theirs].sort().values), p


def test_top_p_of_one_keeps_tokens_whose_mass_above_rounds_to_one():
    logits = torch.tensor([[30.0, 0.0, 0.0, -1e4]])  # in float32 the first token holds all the mass
    got = filter_logits(logits, torch.tensor([3]), torch.tensor([1.0]), torch.tensor([0.0]))
    assert got[0].isfinite().tolist() == [True, True, True, False]


def test_every_token_tied_with_the_kth_stays_even_past_the_ranked_ones():
    logits = torch.tensor([[5.0, 1.0, 3.0, 3.0, 0.0, 3.0, 3.0, 3.0, 2.0]])  # top_k 2 ranks 2 tokens; 5 tie for 2nd
    got = filter_logits(logits, torch.tensor([2]), torch.tensor([1.0]), torch.tensor([0.0]))
    assert (got[0] > float("-inf")).nonzero()[:, 0].tolist() == [0, 2, 3, 5, 6, 7]


def test_draws_follow_the_distribution_and_never_pick_a_dropped_token():
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.3, 0.2, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0, 1.0]])
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([draw(probs.log(), [g, g]) for _ in range(4000)])  # (4000, 2); log 0 = -inf: never drawn
    assert set(draws[:, 1].tolist()) == {5} and set(draws[:, 0].tolist()) == {1, 3, 4}
    shares = torch.bincount(draws[:, 0], minlength=6).float() / 4000
    torch.testing.assert_close(shares, probs[0], atol=0.025, rtol=0)


def test_greedy_rows_take_the_argmax_and_logprobs_are_raw():
    torch.manual_seed(0)
    logits = torch.randn(2, 30)
    params = [SamplingParams(temperature=0, logprobs=3), SamplingParams(temperature=0)]
    choice = sample_rows(logits, params, [None, None])
    assert choice.tokens.tolist() == logits.argmax(-1).tolist()
    logp = torch.log_softmax(logits, -1)
    torch.testing.assert_close(choice.logprobs, logp.gather(1, choice.tokens[:, None])[:, 0])
    assert choice.top_ids[0].tolist() == logp[0].topk(3).indices.tolist()


def test_sampled_rows_report_raw_logprobs_not_the_tempered_filtered_ones():
    """vLLM reports log-probabilities of the model's own distribution, before temperature and top-k;
    a batch of sampled rows only (no greedy row) takes its own path through `sample_rows`."""
    torch.manual_seed(0)
    logits = torch.randn(2, 30)
    params = [SamplingParams(temperature=0.5, top_k=3, logprobs=2, seed=1), SamplingParams(temperature=2.0, logprobs=0, seed=2)]
    choice = sample_rows(logits, params, [torch.Generator().manual_seed(p.seed) for p in params])
    logp = torch.log_softmax(logits, -1)
    torch.testing.assert_close(choice.logprobs, logp.gather(1, choice.tokens[:, None])[:, 0])
    torch.testing.assert_close(choice.top_logprobs[0], logp[0].topk(2).values)


def test_seeded_row_is_independent_of_its_batch():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    p = SamplingParams(temperature=0.9, top_p=0.9, seed=3)
    alone = [int(sample_rows(logits[2:3], [p], [torch.Generator().manual_seed(s)]).tokens[0]) for s in range(20)]
    batched = [int(sample_rows(logits, [p] * 4, [None, None, torch.Generator().manual_seed(s), None]).tokens[2]) for s in range(20)]
    assert alone == batched and len(set(alone)) > 1


def test_a_seeded_row_draws_the_same_token_from_its_ranked_tokens_as_from_the_whole_vocabulary(monkeypatch):
    """Alone, a top-k row draws among its ranked tokens only; beside a flat top-p row (whose nucleus
    reaches past the 8 ranked tokens) the batch goes through the whole vocabulary: same tokens."""
    monkeypatch.setattr(sampling, "CANDIDATES", 8)
    torch.manual_seed(0)
    logits = torch.randn(2, 60) * torch.tensor([[3.0], [0.1]])
    peaked, flat = SamplingParams(temperature=0.8, top_k=5, seed=1), SamplingParams(temperature=1.0, top_p=0.99)
    for seed in range(40):
        alone = sample_rows(logits[:1], [peaked], [torch.Generator().manual_seed(seed)]).tokens[0]
        beside = sample_rows(logits, [peaked, flat], [torch.Generator().manual_seed(seed), None]).tokens[0]
        assert alone == beside
    assert sampling.Ranked.of(logits[1:] / 1.0, torch.tensor([60]), torch.tensor([0.99]), torch.tensor([0.0])).exact.tolist() == [False]


def test_sampled_support_and_frequencies():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(2, 1)
    g = torch.Generator().manual_seed(0)
    params = [SamplingParams(top_k=2), SamplingParams(min_p=0.35)]
    draws = [sample_rows(logits, params, [g, g]).tokens.tolist() for _ in range(400)]
    assert {d[0] for d in draws} == {0, 1} and {d[1] for d in draws} == {0, 1}
    share = sum(d[0] == 0 for d in draws) / len(draws)
    assert abs(share - 0.5 / 0.8) < 0.08  # renormalised over the kept tokens


def test_speculative_sampling_emits_each_token_with_its_own_distribution():
    """Draft [1, 3]: the first token must follow p0 whatever the draft, the second (after a kept 1)
    p1, the third (after 1, 3) p2; with top-k 2 a filtered-out draft token is never kept."""
    p = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25]])
    g = torch.Generator().manual_seed(0)
    runs = [speculative_sample(p.log(), [1, 3], SamplingParams(temperature=1.0), g) for _ in range(4000)]
    share = lambda xs, n=4: torch.bincount(torch.tensor(xs), minlength=n).float() / max(len(xs), 1)
    torch.testing.assert_close(share([r[0] for r in runs]), p[0], atol=0.025, rtol=0)
    torch.testing.assert_close(share([r[1] for r in runs if r[0] == 1]), p[1], atol=0.05, rtol=0)
    torch.testing.assert_close(share([r[2] for r in runs if r[:2] == [1, 3]]), p[2], atol=0.07, rtol=0)
    assert all(len(r) == 3 or r[-1] != [1, 3][len(r) - 1] for r in runs)  # a rejected draft token is never the replacement
    top2 = [speculative_sample(p.log(), [2, 0], SamplingParams(temperature=1.0, top_k=2), g) for _ in range(2000)]
    assert {r[0] for r in top2} == {0, 1} and all(len(r) == 1 for r in top2)
    torch.testing.assert_close(share([r[0] for r in top2]), torch.tensor([0.625, 0.375, 0, 0]), atol=0.03, rtol=0)
    hot = [speculative_sample(p.log(), [3], SamplingParams(temperature=1.0, logit_bias={3: 100.0}), g) for _ in range(50)]
    assert all(r[0] == 3 and len(r) == 2 for r in hot)  # the bias counts in the acceptance



def test_speculative_sampling_matches_the_step_by_step_loop_draw_for_draw():
    """The device-side form (one read back) against the algorithm written out on the host: the same
    generator state gives the same tokens, through rejections, whole drafts and filters."""
    from lmforge.infer.sampling import _biased, _tempered

    def loop(logits, draft, params, g):
        n = logits.size(0)
        col = lambda v, dtype=torch.float32: torch.full((n,), v, dtype=dtype)
        x = _tempered(_biased(logits.float(), [params] * n), col(params.temperature))
        if params.filtered:
            x = filter_logits(x, col(params.top_k, torch.long), col(params.top_p), col(params.min_p))
        kept = torch.softmax(x, dim=-1)[torch.arange(len(draft)), torch.tensor(draft)].tolist()
        u = torch.rand(len(draft), dtype=torch.float64, generator=g).tolist()
        for j, d in enumerate(draft):
            if u[j] >= kept[j]:
                x[j, d] = float("-inf")
                return [*draft[:j], int(draw(x[j:j + 1], [g])[0])]
        return [*draft, int(draw(x[n - 1:], [g])[0])]

    torch.manual_seed(0)
    settings = [SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_k=5), SamplingParams(top_p=0.8, min_p=0.05)]
    outcomes = set()
    for case in range(60):
        k = 1 + case % 4
        logits = torch.randn(k + 1, 12) * 2
        draft = torch.randint(0, 12, (k,)).tolist()
        logits[torch.arange(k), torch.tensor(draft)] += 3 * (case % 3)  # some drafts likely kept whole
        params = settings[case % 3]
        a, b = torch.Generator().manual_seed(case), torch.Generator().manual_seed(case)
        got = speculative_sample(logits, draft, params, a)
        assert got == loop(logits, draft, params, b) and torch.equal(a.get_state(), b.get_state())
        outcomes.add(len(got) == k + 1)
    assert outcomes == {True, False}

def test_penalties_change_the_greedy_choice():
    logits = torch.tensor([[3.0, 2.9, 0.0]])
    counts = torch.tensor([[2.0, 0.0, 0.0]])
    mask = torch.zeros(1, 3, dtype=torch.bool)
    plain = sample_rows(logits, [SamplingParams(temperature=0)], [None], counts, mask).tokens
    pen = sample_rows(logits, [SamplingParams(temperature=0, frequency_penalty=0.1)], [None], counts, mask).tokens
    assert plain.item() == 0 and pen.item() == 1


def test_logit_bias_per_row_before_the_penalties_and_not_in_the_logprobs():
    logits = torch.tensor([[2.0, 1.2, 0.0, -1.0]]).repeat(4, 1)
    kept = logits.clone()
    counts, mask = torch.zeros(4, 4), torch.tensor([[False, True, False, False]] * 4)
    params = [SamplingParams(temperature=0, logit_bias={3: 100.0}, logprobs=0),  # all but forces token 3
              SamplingParams(temperature=0, logit_bias={0: -100.0}),  # bans the argmax
              # bias first (vLLM's order): (1.2 + 1.5) / 2 = 1.35 < 2; the penalty first would give 2.1
              SamplingParams(temperature=0, logit_bias={1: 1.5}, repetition_penalty=2.0),
              SamplingParams(temperature=0)]
    choice = sample_rows(logits, params, [None] * 4, counts, mask)
    assert choice.tokens.tolist() == [3, 1, 0, 0]
    assert torch.equal(logits, kept)  # the caller's logits are left alone
    torch.testing.assert_close(choice.logprobs[0], torch.log_softmax(logits[0], -1)[3])  # raw, as vLLM reports them
    g = torch.Generator().manual_seed(0)
    banned = SamplingParams(temperature=1.0, top_k=2, logit_bias={0: -100.0})  # top-2 of the biased logits: 1 and 2
    assert {int(sample_rows(logits[:1], [banned], [g]).tokens[0]) for _ in range(50)} == {1, 2}


@pytest.mark.parametrize("bad", [dict(top_p=0), dict(min_p=1.5), dict(presence_penalty=3), dict(max_tokens=-1), dict(prompt_logprobs=21),
                                 dict(repetition_penalty=0), dict(logprobs=21), dict(temperature=-0.1),
                                 dict(logit_bias={1: 101.0}), dict(logit_bias={-1: 1.0}), dict(seed=-1), dict(seed=2**64)])
def test_bad_values_are_user_errors(bad):
    with pytest.raises(UserError):
        SamplingParams(**bad)
    if "seed" in bad:  # generate's options too (a seed past 64 bits overflowed inside torch)
        from lmforge.infer import SamplingConfig

        with pytest.raises(UserError, match=r"seed must be in \[0, 2\*\*64\)"):
            SamplingConfig(**bad)


def test_a_huge_top_k_keeps_every_token():
    logits = torch.randn(2, 5)
    params = [SamplingParams(temperature=1.0, top_k=2**70, seed=1), SamplingParams(temperature=1.0, top_k=0, seed=1)]
    gens = [torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)]
    tokens = sample_rows(torch.cat([logits[:1], logits[:1]]), params, gens).tokens
    assert tokens[0] == tokens[1]


def test_a_plain_string_or_id_is_one_stop_not_one_per_character():
    """As vLLM's SamplingParams: stop="END" is one stop string (a tuple of str would split it to "E", "N", "D")."""
    assert SamplingParams(stop="END").stop == ("END",) and SamplingParams(stop=["END", ""]).stop == ("END",)
    assert SamplingParams(stop_token_ids=7).stop_token_ids == (7,)
    assert SamplingParams(stop_token_ids=[7, 8]).stop_token_ids == (7, 8)
    assert SamplingParams(stop=None, stop_token_ids=None).stop == () == SamplingParams().stop_token_ids
