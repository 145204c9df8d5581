"""The speedrun's model options (QK-norm, ReLU^2, zero-init) against hand-written references."""

import math

import pytest
import torch

from lmforge.config import preset
from lmforge.config.presets import SPEEDRUN
from lmforge.interop.hf import config_to_hf
from lmforge.model import Transformer
from lmforge.model.blocks import MLP, SelfAttention
from lmforge.utils.errors import UserError


def rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def rotate(x: torch.Tensor, pos: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """RoPE by its definition: pair (i, i + d/2) rotated by angle pos * theta^(-2i/d)."""
    d = x.size(-1)
    ang = pos[:, None].double() * theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)  # (T, d/2)
    a, b = x[..., : d // 2], x[..., d // 2 :]
    return torch.cat([a * ang.cos() - b * ang.sin(), a * ang.sin() + b * ang.cos()], dim=-1)


def test_qk_norm_attention_equals_naive():
    torch.manual_seed(0)
    cfg = preset("tiny", vocab_size=100, position="rotary", qk_norm=True, bias=False)
    attn = SelfAttention(cfg, layer=0).double().eval()
    with torch.no_grad():
        for p in attn.parameters():  # random norm scales too, so that they are checked
            p.normal_(0.0, 0.3)
    x = torch.randn(2, 9, cfg.n_embd, dtype=torch.float64)
    pos = torch.arange(9)
    ang = pos[:, None].double() * 10000.0 ** (-torch.arange(0, cfg.head_size, 2, dtype=torch.float64) / cfg.head_size)
    rope = (torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin())  # float64 tables
    got = attn(x, rope=rope)

    B, T, C = x.shape
    nh, hs = cfg.n_head, cfg.head_size
    q, k, v = (x @ attn.qkv.weight.T).split(C, dim=2)
    out = torch.zeros(B, T, C, dtype=x.dtype)
    mask = torch.tril(torch.ones(T, T, dtype=torch.bool))
    for h in range(nh):
        sl = slice(h * hs, (h + 1) * hs)
        qh = rotate(rms(q[..., sl], attn.q_norm.weight, cfg.norm_eps), pos)
        kh = rotate(rms(k[..., sl], attn.k_norm.weight, cfg.norm_eps), pos)
        scores = (qh @ kh.transpose(1, 2) / math.sqrt(hs)).masked_fill(~mask, float("-inf"))
        out[..., sl] = torch.softmax(scores, dim=-1) @ v[..., sl]
    torch.testing.assert_close(got, out @ attn.proj.weight.T, rtol=1e-10, atol=1e-10)


def test_relu2_mlp_equals_formula():
    torch.manual_seed(0)
    cfg = preset("tiny", vocab_size=100, mlp="relu2")
    mlp = MLP(cfg).double()
    x = torch.randn(3, 5, cfg.n_embd, dtype=torch.float64)
    h = x @ mlp.fc.weight.T + mlp.fc.bias
    want = torch.where(h > 0, h * h, torch.zeros_like(h)) @ mlp.proj.weight.T + mlp.proj.bias
    torch.testing.assert_close(mlp(x), want, rtol=1e-12, atol=1e-12)


def test_zero_init_makes_blocks_identity_and_logits_uniform():
    torch.manual_seed(0)
    model = Transformer(preset("tiny", vocab_size=100, **SPEEDRUN))
    for block in model.layers:
        assert not block.attention.proj.weight.any() and not block.feed_forward.proj.weight.any()
        assert block.attention.qkv.weight.std() > 0.01  # the rest keeps its random init
    assert not model.output.weight.any() and model.tok_embeddings.weight.std() > 0.01
    idx = torch.randint(0, 100, (2, 10))
    assert not model(idx).any()  # zero head: uniform predictions, loss ln(V) at step 0
    x = model.tok_embeddings(idx)
    torch.testing.assert_close(model.encode(idx), model.norm(x))  # every block is the identity


def test_zero_init_head_needs_untied_head():
    with pytest.raises(UserError, match="tie_embeddings false"):
        preset("tiny", vocab_size=100, zero_init_head=True)


def test_speedrun_preset_trains_a_step_and_is_not_exported():
    cfg = preset("gpt2-124m-speedrun", vocab_size=50257)
    assert cfg.padded_vocab_size == 50304 and cfg.head_size == 128 and not cfg.tie_embeddings
    with pytest.raises(UserError, match="qk_norm"):
        config_to_hf(cfg)
    with pytest.raises(UserError, match="relu2"):
        config_to_hf(preset("tiny", vocab_size=100, mlp="relu2"))
    # A tiny model with every option runs forward and backward with finite gradients.
    model = Transformer(preset("tiny", vocab_size=100, **SPEEDRUN))
    idx = torch.randint(0, 100, (2, 12))
    torch.nn.functional.cross_entropy(model(idx).flatten(0, 1), idx.flatten()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
