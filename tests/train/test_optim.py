import math

import pytest
from torch import nn

from lmforge.config import TrainConfig, preset
from lmforge.model import Transformer
from lmforge.train.optim import lr_at, param_groups


def test_lr_schedule_values():
    cfg = TrainConfig(max_steps=110, warmup_steps=10, lr=1e-3, min_lr=1e-4)
    # Linear warmup: step s (0-based) gets lr * (s + 1) / warmup.
    assert lr_at(0, cfg) == pytest.approx(1e-4)
    assert lr_at(4, cfg) == pytest.approx(5e-4)
    assert lr_at(9, cfg) == pytest.approx(1e-3)
    # Cosine from lr at the end of warmup to min_lr at max_steps; halfway is the mean of the two.
    assert lr_at(10, cfg) == pytest.approx(1e-3)
    assert lr_at(60, cfg) == pytest.approx(5.5e-4)
    assert lr_at(35, cfg) == pytest.approx(1e-4 + 0.5 * (1 + math.cos(math.pi * 0.25)) * 9e-4)
    assert lr_at(110, cfg) == pytest.approx(1e-4)
    assert lr_at(500, cfg) == pytest.approx(1e-4)


def test_no_decay_on_norms_biases_and_embeddings():
    model = Transformer(preset("tiny", vocab_size=100))
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    kept = {names[id(p)] for p in no_decay["params"]}
    assert decayed and all(n.endswith("weight") and ("qkv" in n or "proj" in n or "fc" in n) for n in decayed)
    assert "tok_embeddings.weight" in kept and "pos_embeddings.weight" in kept
    assert any(n.endswith("bias") for n in kept) and any("norm" in n for n in kept)
    # Every parameter exactly once (the tied head is the embedding).
    assert len(decayed) + len(kept) == len(list(model.parameters()))
    for m in model.modules():
        if isinstance(m, nn.LayerNorm):
            assert names[id(m.weight)] in kept
