import pytest
import torch

from lmforge.config import preset
from lmforge.infer import SamplingConfig, generate_tokens, load, sample
from lmforge.model import Transformer
from lmforge.utils.errors import UserError


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Transformer(preset("tiny", vocab_size=100, context_length=32)).eval()


@pytest.mark.parametrize("sampling", [SamplingConfig(temperature=0), SamplingConfig(temperature=1.0, top_k=20, seed=5)])
def test_cache_equals_no_cache(model, sampling):
    """Incremental decoding with the KV cache picks the same tokens as recomputing everything,
    including past the context length where the window slides."""
    prompt = [1, 2, 3, 4, 5]
    cached = list(generate_tokens(model, prompt, 50, sampling, use_cache=True))
    full = list(generate_tokens(model, prompt, 50, sampling, use_cache=False))
    assert len(cached) == 50 and cached == full


def test_greedy_equals_argmax_of_full_forward(model):
    seq = [7, 8, 9]
    for tid in generate_tokens(model, seq, 10, SamplingConfig(temperature=0)):
        expected = model(torch.tensor([seq]))[0, -1, :100].argmax().item()
        assert tid == expected
        seq.append(tid)


@pytest.mark.parametrize("temperature", [1e-6, 1e-40, 1e-45])
def test_a_tiny_temperature_is_greedy(model, temperature):
    """Below 1e-5 (the Engine's threshold) the scaled logits overflow to inf; such a temperature
    once drew the last token id every step instead of the argmax."""
    greedy = list(generate_tokens(model, [7, 8, 9], 8, SamplingConfig(temperature=0)))
    assert list(generate_tokens(model, [7, 8, 9], 8, SamplingConfig(temperature=temperature, seed=1))) == greedy


def test_same_seed_same_sample_and_seeds_differ(model):
    run = lambda seed: list(generate_tokens(model, [1], 20, SamplingConfig(temperature=1.0, seed=seed)))
    assert run(11) == run(11)
    assert run(11) != run(12)


def test_stop_token_ends_generation(model):
    first = next(iter(generate_tokens(model, [1, 2], 5, SamplingConfig(temperature=0))))
    out = list(generate_tokens(model, [1, 2], 5, SamplingConfig(temperature=0), stop_tokens=(first,)))
    assert out == [first]


def test_top_k_and_top_p_restrict_the_support():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = lambda cfg: {sample(logits, cfg, g).item() for _ in range(300)}
    assert draws(SamplingConfig(top_k=2)) == {0, 1}
    assert draws(SamplingConfig(top_p=0.7)) == {0, 1}  # 0.5 < 0.7, so the second token is needed too
    assert draws(SamplingConfig(top_p=0.45)) == {0}
    assert draws(SamplingConfig(top_k=1)) == {0}
    assert draws(SamplingConfig()) == {0, 1, 2, 3}
    assert draws(SamplingConfig(top_k=10**20)) == {0, 1, 2, 3}  # past int64: keeps all, as any k past the vocabulary


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_samples_follow_the_tempered_softmax(temperature):
    """Independent reference: the frequencies of 4,000 draws against softmax(logits / T)."""
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    draws = sample(logits.expand(4000, 3), SamplingConfig(temperature=temperature), torch.Generator().manual_seed(0))
    shares = torch.bincount(draws, minlength=3).float() / 4000
    torch.testing.assert_close(shares, torch.softmax(logits[0] / temperature, -1), atol=0.03, rtol=0)


def test_prompt_longer_than_context_is_a_user_error(model):
    with pytest.raises(UserError, match="longer than the model's context of 32"):
        list(generate_tokens(model, list(range(40)), 1))


def test_bad_sampling_values():
    with pytest.raises(UserError, match="top_p"):
        SamplingConfig(top_p=0)
    for temperature in (-1, float("nan")):
        with pytest.raises(UserError, match="temperature must be >= 0"):
            SamplingConfig(temperature=temperature)


def test_load_and_generate_text(trained_run):
    lm = load(trained_run.out, device="cpu")
    assert lm.path == trained_run.checkpoint
    a = lm.generate("ROMEO:", 30, temperature=0.8, seed=1)
    assert a == lm.generate("ROMEO:", 30, temperature=0.8, seed=1)
    assert len(a) > 0
    pieces = list(lm.stream("ROMEO:", 30, temperature=0.8, seed=1))
    assert "".join(pieces) == a and len(pieces) > 1


def test_bf16_weights_predict_what_fp32_does(trained_run):
    fp32, bf16 = load(trained_run.out, device="cpu"), load(trained_run.out, device="cpu", dtype="bfloat16")
    assert fp32.model.output.weight.dtype == torch.float32 and bf16.model.output.weight.dtype == torch.bfloat16
    ids = torch.tensor([fp32.tokenizer.encode("ROMEO:\nWhat light through yonder window breaks?")])
    with torch.inference_mode():
        a, b = fp32.model(ids).float(), bf16.model(ids).float()
    assert (a.softmax(-1) - b.softmax(-1)).abs().max() < 0.05  # bf16 keeps 8 bits of mantissa
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.9
    assert bf16.generate("ROMEO:", 12, temperature=0.0)  # the KV cache follows the weights' dtype
    assert bf16.model.new_cache(1, 16).k[0].dtype == torch.bfloat16
    with pytest.raises(UserError, match="unknown dtype 'fp16'"):
        load(trained_run.out, device="cpu", dtype="fp16")


def test_encoder_cannot_generate():
    encoder = Transformer(preset("bert-base", vocab_size=100, n_layer=1, n_embd=64, n_head=4, mlp_hidden=128)).eval()
    with pytest.raises(UserError, match="encoder model cannot generate"):
        list(generate_tokens(encoder, [1, 2], 3))
