import pytest
import torch
from torch import nn

from lmforge.config import LoraConfig, ModelConfig, preset
from lmforge.model import Transformer
from lmforge.model.lora import LoRALinear, lora_parameters, merge_lora
from lmforge.utils.errors import UserError


def _pair(targets: str, **model):
    base_cfg = preset("tiny").replace(vocab_size=97, n_kv_head=2, **model)
    torch.manual_seed(0)
    base = Transformer(base_cfg)
    lora = Transformer(base_cfg.replace(lora=LoraConfig(r=4, alpha=8, targets=targets)))
    missing = lora.load_state_dict(base.state_dict(), strict=False).missing_keys
    assert missing and all(".lora_" in k for k in missing)
    return base, lora


def test_starts_as_the_base_model_then_adds_scale_BA_on_the_targeted_rows():
    base, lora = _pair("q,v")
    x = torch.randint(0, 97, (2, 7))
    assert torch.equal(base(x), lora(x))  # B = 0 at init
    layer = lora.layers[0].attention.qkv
    assert isinstance(layer, LoRALinear) and len(layer.lora_A) == 2
    for b in layer.lora_B:
        nn.init.normal_(b)
    # Independent reference: the dense update matrix, zero on the k rows.
    c, kv = 64, 2 * 16  # tiny: n_embd 64, 4 heads of 16; 2 kv heads
    delta = torch.zeros_like(layer.weight)
    delta[:c] = layer.lora_B[0] @ layer.lora_A[0] * 2.0
    delta[c + kv :] = layer.lora_B[1] @ layer.lora_A[1] * 2.0
    h = torch.randn(3, c)
    torch.testing.assert_close(layer(h), h @ (layer.weight + delta).T + layer.bias)


@pytest.mark.parametrize("targets,cross_q,cross_kv", [("v", None, [(64, 128)]), ("k", None, [(0, 64)]), ("q,v", [(0, 64)], [(64, 128)])])
def test_cross_attention_adapters_sit_on_the_named_projection(targets, cross_q, cross_kv):
    """An encoder-decoder's cross-attention fuses keys then values of the memory in `kv`: `v` must adapt
    the value rows (64..128 at n_embd 64), not the keys."""
    cfg = preset("transformer-base", vocab_size=97, n_layer=1, n_encoder_layer=1, n_embd=64, n_head=4, mlp_hidden=128,
                 context_length=16, lora=LoraConfig(r=2, targets=targets))
    cross = Transformer(cfg).layers[0].cross_attention
    assert (getattr(cross.q, "slices", None), getattr(cross.kv, "slices", None)) == (cross_q, cross_kv)


def test_each_adapted_slice_of_a_fused_layer_draws_its_own_dropout_mask():
    """PEFT adapts q_proj and v_proj as two layers with a dropout each; lmforge's q and v are slices of
    one fused qkv, which must not share one mask (that would correlate the two adapters' noise)."""
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(8, 24), [(0, 8), (16, 24)], LoraConfig(r=8, alpha=8, dropout=0.5))
    with torch.no_grad():
        layer.lora_A[1].copy_(layer.lora_A[0])
        for b in layer.lora_B:
            b.copy_(torch.eye(8))
    x = torch.randn(4, 8)
    update = layer(x) - nn.functional.linear(x, layer.weight, layer.bias)  # train mode: dropout on
    assert not torch.allclose(update[:, :8], update[:, 16:])  # one shared mask made these equal
    layer.eval()
    update = layer(x) - nn.functional.linear(x, layer.weight, layer.bias)
    torch.testing.assert_close(update[:, :8], update[:, 16:])


@pytest.mark.parametrize("targets", ["q,v", "all-linear", "down,o,up"])
def test_merge_folds_the_adapters_into_plain_linears(targets):
    _, lora = _pair(targets, mlp="swiglu")
    for p in lora_parameters(lora):
        nn.init.normal_(p, std=0.05)
    x = torch.randint(0, 97, (2, 7))
    before = lora(x)
    assert merge_lora(lora) > 0
    assert not any(isinstance(m, LoRALinear) for m in lora.modules())
    assert not any(".lora_" in k for k in lora.state_dict())
    torch.testing.assert_close(lora(x), before, atol=1e-5, rtol=1e-5)


def test_all_linear_adapts_every_block_linear_but_no_head_or_embedding():
    _, lora = _pair("all-linear")
    wrapped = {n for n, m in lora.named_modules() if isinstance(m, LoRALinear)}
    linears = {n for n, m in lora.named_modules() if isinstance(m, nn.Linear) and n.startswith("layers.")}
    assert wrapped == linears
    assert not isinstance(lora.output, LoRALinear)


def test_bad_targets_are_one_line():
    with pytest.raises(UserError, match="lora.targets"):
        LoraConfig(r=4, targets="q,qq")


def test_lora_config_round_trips_through_json_and_rejects_unknown_keys():
    from lmforge.config import ModelConfig

    cfg = preset("tiny").replace(vocab_size=10, lora=LoraConfig(r=2, targets="all-linear"))
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(UserError, match="unknown model.lora key"):
        ModelConfig.from_dict({**cfg.to_dict(), "lora": {"r": 2, "rank": 3}})


@pytest.mark.parametrize("targets", ["gate", "q,gate"])
def test_a_gate_target_without_a_gated_mlp_is_one_line(targets):
    # A GELU MLP has no gate: the adapter would match no layer and fine-tuning train only the head.
    with pytest.raises(UserError, match="'gate' needs model.mlp swiglu"):
        LoraConfig(r=4, targets=targets).check_adapts("gelu")
    LoraConfig(r=4, targets=targets).check_adapts("swiglu")
    # A checkpoint written before the check (its adapter on a missing gate) still loads.
    stored = preset("tiny").replace(vocab_size=10, mlp="gelu", lora=LoraConfig(r=4, targets=targets))
    assert ModelConfig.from_dict(stored.to_dict()) == stored
    lora = Transformer(preset("tiny").replace(vocab_size=10, mlp="gelu", lora=LoraConfig(r=4, targets="all-linear")))
    assert any(isinstance(m, LoRALinear) for m in lora.modules())  # all-linear takes what the MLP has


@pytest.mark.parametrize("targets", ["", " , "])
def test_an_empty_target_list_is_one_line(targets):
    with pytest.raises(UserError, match="lora.targets is empty"):
        LoraConfig(r=4, targets=targets).check_adapts("swiglu")
