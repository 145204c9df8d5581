"""Beam search: the cached, batched search against a naive one that recomputes every hypothesis."""

import pytest
import torch

from lmforge.config import preset
from lmforge.infer import SamplingConfig, beam_search, beam_search_batch, generate_tokens
from lmforge.model import Transformer


def naive_beam(model, prompt, k, n):
    """Beam search without a cache or end token: keep the k best of every (beam, token) extension."""
    beams = [([], 0.0)]
    with torch.no_grad():
        for _ in range(n):
            cand = []
            for tokens, score in beams:
                logp = torch.log_softmax(model(torch.tensor([prompt + tokens]))[0, -1, :100].float(), -1)
                cand += [(tokens + [t], score + float(logp[t])) for t in range(100)]
            beams = sorted(cand, key=lambda c: -c[1])[:k]
    return beams


def sequence_logprob(model, prompt, tokens):
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([prompt + tokens]))[0, :, :100].float(), -1)
    return sum(float(logp[len(prompt) - 1 + i, t]) for i, t in enumerate(tokens))


def test_beam_of_one_is_greedy(varied_model):
    hyp = beam_search(varied_model, [1, 2, 3], beam_size=1, max_new_tokens=10)[0]
    assert hyp.tokens == list(generate_tokens(varied_model, [1, 2, 3], 10, SamplingConfig(temperature=0)))


@pytest.mark.parametrize("k", [2, 4])
def test_beam_equals_naive_search_and_beats_greedy(varied_model, k):
    prompt = [4, 8, 15]
    hyps = beam_search(varied_model, prompt, beam_size=k, max_new_tokens=6, length_penalty=0.0)
    ref = naive_beam(varied_model, prompt, k, 6)
    assert [h.tokens for h in hyps] == [t for t, _ in ref]
    for h, (_, s) in zip(hyps, ref):
        assert h.logprob == pytest.approx(s, abs=1e-4) and h.score == pytest.approx(s, abs=1e-4)
    greedy = list(generate_tokens(varied_model, prompt, 6, SamplingConfig(temperature=0)))
    assert hyps[0].logprob >= sequence_logprob(varied_model, prompt, greedy) - 1e-5
    assert hyps[0].logprob == pytest.approx(sequence_logprob(varied_model, prompt, hyps[0].tokens), abs=1e-4)


def test_end_token_and_length_penalty(varied_model):
    eos = beam_search(varied_model, [1, 2], beam_size=1, max_new_tokens=5)[0].tokens[2]
    hyps = beam_search(varied_model, [1, 2], beam_size=3, max_new_tokens=8, eos_id=eos, length_penalty=1.0)
    assert len(hyps) == 3 and all(h.score == pytest.approx(h.logprob / len(h.tokens)) for h in hyps)
    assert [h.score for h in hyps] == sorted((h.score for h in hyps), reverse=True)
    assert all(eos not in h.tokens[:-1] for h in hyps)


def test_encoder_decoder_beam_of_one_is_greedy():
    torch.manual_seed(0)
    m = Transformer(preset("transformer-base", vocab_size=60, n_layer=1, n_encoder_layer=1, n_embd=32, n_head=2,
                           mlp_hidden=64, context_length=32, dropout=0.0)).eval()
    src = torch.tensor([[5, 6, 7, 8]])
    memory = m.encode_source(src)
    hyp = beam_search(m, [1], beam_size=1, max_new_tokens=8, memory=memory)[0]
    assert hyp.tokens == list(generate_tokens(m, [1], 8, SamplingConfig(temperature=0), memory=memory))
    assert len(beam_search(m, [1], beam_size=3, max_new_tokens=8, memory=memory)) == 3


@pytest.mark.parametrize("k", [1, 3])
def test_a_batch_of_padded_sources_searches_as_each_source_alone(k):
    torch.manual_seed(0)
    m = Transformer(preset("transformer-base", vocab_size=60, n_layer=2, n_encoder_layer=2, n_embd=32, n_head=2,
                           mlp_hidden=64, context_length=32, dropout=0.0)).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.3)  # outputs that depend on the source (a small init mostly ignores it)
    sources = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [20, 21, 22, 23]]
    src = torch.zeros(3, 7, dtype=torch.long)
    mask = torch.zeros(3, 7, dtype=torch.long)
    for i, s in enumerate(sources):
        src[i, : len(s)], mask[i, : len(s)] = torch.tensor(s), 1
    with torch.no_grad():
        memory = m.encode_source(src, mask)
        alone = [beam_search(m, [1], k, 10, eos_id=2, memory=m.encode_source(torch.tensor([s]))) for s in sources]
    batched = beam_search_batch(m, [[1]] * 3, k, 10, eos_id=2, memory=memory, memory_mask=mask)
    assert len({tuple(h[0].tokens) for h in batched}) == 3  # the sources really differ
    for got, want in zip(batched, alone):
        assert [h.tokens for h in got] == [h.tokens for h in want]
        assert [h.score for h in got] == pytest.approx([h.score for h in want], abs=1e-4)


def hf_gpt2_pair(seed):
    """A tiny transformers GPT-2 with varied weights, and lmforge's model holding the same weights."""
    transformers = pytest.importorskip("transformers")
    from lmforge.interop.hf import config_from_hf, state_dict_from_hf

    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=64, vocab_size=100, tie_word_embeddings=False,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.3)
    c = config_from_hf(cfg.to_dict())
    m = Transformer(c)
    m.load_state_dict(state_dict_from_hf(c, dict(hf.state_dict())), strict=False)
    return m.eval(), hf


# Seed 0 with prompt [1, 2, 3] once finished end tokens ranked past the top K (transformers ignores
# them), so its lists held extra short hypotheses.
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_beam_matches_transformers_with_an_end_token(seed):
    m, hf = hf_gpt2_pair(seed)
    prompt, n = [1, 2, 3], 8
    with torch.no_grad():
        greedy = hf.generate(torch.tensor([prompt]), max_new_tokens=3, do_sample=False, pad_token_id=0)[0, 3:].tolist()
    for eos in greedy[1:]:  # end tokens the model likes, so hypotheses end early
        for k in (3, 4):
            for lp in (0.0, 1.0):
                ours = beam_search(m, prompt, beam_size=k, max_new_tokens=n, length_penalty=lp, eos_id=eos)
                with torch.no_grad():
                    out = hf.generate(torch.tensor([prompt]), num_beams=k, num_return_sequences=k, max_new_tokens=n,
                                      length_penalty=lp, eos_token_id=eos, pad_token_id=eos, do_sample=False,
                                      early_stopping=False, return_dict_in_generate=True, output_scores=True)
                theirs = [row[3:] for row in out.sequences.tolist()]
                theirs = [t[: t.index(eos) + 1] if eos in t else t for t in theirs]
                assert [h.tokens for h in ours] == theirs, (eos, k, lp)
                assert [h.score for h in ours] == pytest.approx(out.sequences_scores.tolist(), abs=1e-4)
