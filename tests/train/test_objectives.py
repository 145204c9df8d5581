import json
import math

import pytest

from conftest import tiny_train_config
from lmforge.config import preset
from lmforge.train import pretrain
from lmforge.utils.errors import UserError

quiet = dict(progress=False, log=lambda *a: None)
TINY_BERT = preset("bert-base", n_layer=2, n_embd=64, n_head=4, mlp_hidden=128, context_length=64)


@pytest.mark.parametrize("objective", ["mlm", "mlm+nsp"])
def test_tiny_bert_lowers_its_masked_lm_loss(objective, data_dir, tmp_path):
    cfg = tiny_train_config(max_steps=150, eval_interval=50, batch_size=16, lr=3e-3, min_lr=3e-4)
    run = pretrain(data_dir, tmp_path / "bert", TINY_BERT, cfg, objective=objective, **quiet)
    val = [r["val_loss"] for r in map(json.loads, (run.out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "val"]
    assert len(val) == 3 and run.val_bpb is None  # masked-LM loss is not a compression rate of the text
    # Chance is ln(512) = 6.24 nats per masked token (+ ln 2 = 0.69 for the next-sentence guess).
    chance = math.log(512) + (math.log(2) if objective == "mlm+nsp" else 0.0)
    assert val[-1] < chance - 1.0
    assert val[-1] < val[0] - (0.05 if objective == "mlm" else 0.02)  # NSP on 64-token spans learns slowly


def test_objective_must_fit_the_architecture(data_dir, tmp_path):
    with pytest.raises(UserError, match="trains encoder models"):
        pretrain(data_dir, tmp_path / "a", "tiny", tiny_train_config(), objective="mlm", **quiet)
    with pytest.raises(UserError, match="trains decoder models"):
        pretrain(data_dir, tmp_path / "b", TINY_BERT, tiny_train_config(), **quiet)
    with pytest.raises(UserError, match="two token types"):
        pretrain(data_dir, tmp_path / "c", TINY_BERT.replace(type_vocab_size=0), tiny_train_config(), objective="mlm+nsp", **quiet)


def test_chunked_loss_trains_like_the_plain_loss(data_dir, tmp_path):
    """--train.chunked_loss gives the same run as full logits (fp32: equal up to rounding)."""
    cfg = tiny_train_config(max_steps=10, eval_interval=10, ckpt_interval=0)
    plain = pretrain(data_dir, tmp_path / "plain", "tiny", cfg, **quiet)
    chunked = pretrain(data_dir, tmp_path / "chunked", "tiny", cfg.replace(chunked_loss=100), **quiet)
    assert chunked.train_loss == pytest.approx(plain.train_loss, abs=1e-4)
    assert chunked.val_loss == pytest.approx(plain.val_loss, abs=1e-4)
    with pytest.raises(UserError, match="causal objective only"):
        pretrain(data_dir, tmp_path / "d", TINY_BERT, cfg.replace(chunked_loss=100), objective="mlm", **quiet)
