import math

import pytest
import torch

from lmforge.config import preset
from lmforge.config.presets import SPEEDRUN
from lmforge.model import Transformer
from lmforge.model.blocks import MLP, SelfAttention, rope_inv_freq, sinusoidal_table


def naive_attention(x: torch.Tensor, attn: SelfAttention) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d) + causal mask) V, head by head, with plain matmuls."""
    B, T, C = x.shape
    nh, hs = attn.n_head, attn.head_size
    q, k, v = (x @ attn.qkv.weight.T + attn.qkv.bias).split(C, dim=2)
    out = torch.zeros(B, T, C, dtype=x.dtype)
    mask = torch.tril(torch.ones(T, T, dtype=torch.bool))
    for h in range(nh):
        sl = slice(h * hs, (h + 1) * hs)
        scores = q[..., sl] @ k[..., sl].transpose(1, 2) / math.sqrt(hs)
        scores = scores.masked_fill(~mask, float("-inf"))
        out[..., sl] = torch.softmax(scores, dim=-1) @ v[..., sl]
    return out @ attn.proj.weight.T + attn.proj.bias


def test_attention_equals_naive_softmax():
    torch.manual_seed(0)
    cfg = preset("tiny", vocab_size=100)
    attn = SelfAttention(cfg, layer=0).double().eval()
    for p in attn.parameters():  # non-zero biases so they are checked too
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(3, 11, cfg.n_embd, dtype=torch.float64)
    torch.testing.assert_close(attn(x), naive_attention(x, attn), rtol=1e-10, atol=1e-10)


def test_sinusoidal_table_equals_formula():
    n, d = 50, 16
    table = sinusoidal_table(n, d)
    for pos in range(n):
        for i in range(d // 2):
            assert table[pos, 2 * i].item() == pytest.approx(math.sin(pos / 10000 ** (2 * i / d)), abs=1e-6)
            assert table[pos, 2 * i + 1].item() == pytest.approx(math.cos(pos / 10000 ** (2 * i / d)), abs=1e-6)


@pytest.mark.parametrize("options", [dict(position="learned"), dict(position="sinusoidal"), SPEEDRUN],
                         ids=["learned", "sinusoidal", "speedrun"])
def test_cached_forward_equals_full_forward(options):
    """Prefill, a multi-token chunk after the cache, then single tokens: same logits as one pass
    (with the speedrun options too: QK-norm runs before the KV cache)."""
    torch.manual_seed(0)
    model = Transformer(preset("tiny", vocab_size=100, **options)).eval()
    if options is SPEEDRUN:
        with torch.no_grad():
            for p in model.parameters():  # away from the zero init, so that every block matters
                p.normal_(0.0, 0.2)
    idx = torch.randint(0, 100, (2, 20))
    full = model(idx)
    cache = model.new_cache(batch_size=2)
    pieces = [model(idx[:, :7], cache=cache, start=0), model(idx[:, 7:12], cache=cache, start=7)]
    pieces += [model(idx[:, t : t + 1], cache=cache, start=t) for t in range(12, 20)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)


def test_parameter_count_and_flops():
    cfg = preset("tiny", vocab_size=128)
    model = Transformer(cfg)
    C, L, V, T = cfg.n_embd, cfg.n_layer, cfg.padded_vocab_size, cfg.context_length
    per_block = (C * 3 * C + 3 * C) + (C * C + C) + (C * 4 * C + 4 * C) + (4 * C * C + C) + 2 * 2 * C
    expected = V * C + L * per_block + 2 * C  # tied head; final norm; positions excluded
    assert model.num_params() == expected
    assert model.num_params(exclude_positions=False) == expected + T * C
    assert model.flops_per_token() == 6 * expected + 12 * L * C * T
    # An encoder-decoder attends in its 3 encoder blocks and twice (self, cross) in its 2 decoder blocks.
    seq2seq = Transformer(preset("transformer-base", vocab_size=128, n_layer=2, n_encoder_layer=3, n_embd=32, n_head=4,
                                 mlp_hidden=64, context_length=16))
    assert seq2seq.flops_per_token() == 6 * seq2seq.num_params() + 12 * (3 + 2 * 2) * 32 * 16


def test_rope_scalings_keep_or_divide_the_frequencies_they_should():
    """Linear (Chen et al. 2023) divides every frequency by the factor; NTK-aware (bloc97) keeps the
    highest (theta^0 = 1) and divides the lowest by exactly the factor, from theta * f^(d / (d - 2))."""
    plain = rope_inv_freq(preset("tiny", position="rotary"))
    linear = rope_inv_freq(preset("tiny", position="rotary", rope_scaling="linear", rope_factor=4.0))
    ntk = rope_inv_freq(preset("tiny", position="rotary", rope_scaling="ntk", rope_factor=4.0))
    torch.testing.assert_close(linear, plain / 4)
    assert ntk[0] == 1.0 and ntk[-1].item() == pytest.approx(plain[-1].item() / 4, rel=1e-12)
    assert (ntk[1:-1] < plain[1:-1]).all() and (ntk[1:-1] > plain[1:-1] / 4).all()


def test_gelu_tanh_is_gpt2s_approximation_not_the_erf_gelu():
    """GPT-2's `gelu_new` is the tanh approximation; the two differ by ~1e-3 where |x| is around 2."""
    torch.manual_seed(0)
    mlp = MLP(preset("tiny", mlp="gelu_tanh")).double().eval()
    x = 5 * torch.randn(4, 64, dtype=torch.float64)
    h = mlp.fc(x)
    tanh = 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3)))  # Hendrycks & Gimpel, eq. 2
    torch.testing.assert_close(mlp(x), mlp.proj(tanh))
    assert not torch.allclose(mlp(x), mlp.proj(torch.nn.functional.gelu(h)), atol=1e-5)


def test_embed_scale_multiplies_token_embeddings_by_sqrt_n_embd():
    """"Attention Is All You Need", 3.4: token embeddings times sqrt(d_model), then the positions."""
    cfg = preset("tiny", vocab_size=100, position="sinusoidal", embed_scale=True)
    model = Transformer(cfg)
    idx, pos = torch.tensor([[5, 9, 2]]), torch.arange(3)
    expected = model.tok_embeddings.weight[idx] * math.sqrt(cfg.n_embd) + sinusoidal_table(cfg.context_length, cfg.n_embd)[pos]
    torch.testing.assert_close(model._embed(idx, pos), expected)


def test_gpt2_init_scales_the_residual_projections_by_one_over_sqrt_2_n_layer():
    torch.manual_seed(0)
    cfg = preset("tiny", vocab_size=100, n_layer=8, n_embd=128, n_head=4)
    block = Transformer(cfg).layers[0]
    assert block.attention.proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.05)
    assert block.feed_forward.proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.05)
    assert block.feed_forward.fc.weight.std().item() == pytest.approx(0.02, rel=0.05)


def test_a_pre_norm_encoder_ends_in_its_final_norm():
    """Pre-norm blocks leave the residual stream unnormalised; the encoder's memory goes through a
    final LayerNorm (zero mean, unit variance per token at init), as the decoder's output does."""
    torch.manual_seed(0)
    model = Transformer(preset("transformer-base", vocab_size=100, n_layer=1, n_encoder_layer=2, n_embd=32, n_head=4,
                               mlp_hidden=64, context_length=16, norm_position="pre", dropout=0.0)).eval()
    memory = model.encode_source(torch.randint(0, 100, (2, 9)))
    torch.testing.assert_close(memory.mean(-1), torch.zeros(2, 9), atol=1e-5, rtol=0)
    torch.testing.assert_close(memory.var(-1, unbiased=False), torch.ones(2, 9), atol=1e-3, rtol=0)


def test_tied_embeddings_share_storage():
    model = Transformer(preset("tiny", vocab_size=100))
    assert model.output.weight is model.tok_embeddings.weight
    untied = Transformer(preset("tiny", vocab_size=100, tie_embeddings=False))
    assert untied.output.weight is not untied.tok_embeddings.weight


def test_padded_vocab():
    assert preset("tiny", vocab_size=100).padded_vocab_size == 128
    assert preset("tiny", vocab_size=128).padded_vocab_size == 128


def test_encode_source_longer_than_the_context_is_refused_like_encode():
    cfg = preset("transformer-base", vocab_size=50, n_layer=1, n_encoder_layer=1, n_embd=32, n_head=4, mlp_hidden=64,
                 context_length=16)
    model = Transformer(cfg).eval()
    with pytest.raises(ValueError, match="source of 17 tokens exceeds the context of 16"):
        model.encode_source(torch.randint(0, 50, (1, 17)))
    assert model.encode_source(torch.randint(0, 50, (1, 16))).shape == (1, 16, 32)


@pytest.mark.parametrize("position", ["rotary", "sinusoidal"])
def test_an_unfilled_model_loads_to_the_same_model_and_leaves_torch_init_as_it_was(position):
    """`Transformer.unfilled` (what load_model builds) skips the random fills, not the tables computed in
    __init__ (rotary, sinusoidal), and puts torch.nn.init back."""
    from torch import nn

    fills = dict(vars(nn.init))
    cfg = preset("tiny", vocab_size=128, position=position, norm="rmsnorm")
    torch.manual_seed(0)
    ref = Transformer(cfg).eval()
    empty = Transformer.unfilled(cfg)
    assert dict(vars(nn.init)) == fills
    assert {k: v.shape for k, v in empty.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    for (name, a), (_, b) in zip(ref.named_buffers(), empty.named_buffers()):
        assert torch.equal(a, b), name
    empty.load_state_dict(ref.state_dict())
    idx = torch.randint(0, 128, (2, 16))
    assert torch.equal(empty.eval()(idx), ref(idx))


def test_unfilled_models_built_on_several_threads_leave_torch_init_as_it_was():
    """Seen in review: two threads loading at once, each restoring the fills it found, could restore the
    other's no-ops, and every model built afterwards in the process started from uninitialised memory."""
    import threading
    import time

    from torch import nn

    class Slow(Transformer):  # a build long enough for the threads' builds to overlap
        def __init__(self, config):
            time.sleep(0.02)
            super().__init__(config)

    fills = dict(vars(nn.init))
    cfg = preset("tiny", vocab_size=128)

    def build(delay: float) -> None:
        time.sleep(delay)
        for _ in range(3):
            Slow.unfilled(cfg)

    threads = [threading.Thread(target=build, args=(i * 0.01,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert dict(vars(nn.init)) == fills
    torch.manual_seed(0)
    assert 0.01 < Transformer(cfg).tok_embeddings.weight.std().item() < 0.1
