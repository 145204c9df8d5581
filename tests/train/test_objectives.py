import json
import math

import pytest
import torch

from conftest import tiny_train_config
from lmforge.config import preset
from lmforge.model import Transformer
from lmforge.model.losses import lm_loss
from lmforge.tokenizer import Tokenizer
from lmforge.train.objectives import Objective, weighted_mean_loss
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


@pytest.mark.parametrize("chunked", [0, 50])
def test_label_smoothing_shapes_the_training_loss_and_validation_stays_plain(data_dir, chunked):
    tokenizer = Tokenizer.load(data_dir)
    cfg = preset("tiny", vocab_size=tokenizer.vocab_size, dropout=0.0)
    torch.manual_seed(0)
    net = Transformer(cfg)
    with torch.no_grad():
        net.output.weight.mul_(30)  # confident predictions, as after training, which smoothing penalises
    task = Objective("causal", cfg, tokenizer, seed=0, chunked_loss=chunked, label_smoothing=0.1)
    batch = task.batch(task.open(str(data_dir), "train", 32), 4, step=0)
    with torch.no_grad():
        logits = net(batch["input_ids"])
        smoothed = task.loss(net.train(), batch)
        plain = task.loss(net.eval(), batch)
    torch.testing.assert_close(smoothed, lm_loss(logits, batch["labels"], label_smoothing=0.1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(plain, lm_loss(logits, batch["labels"]), rtol=1e-5, atol=1e-5)
    assert abs(smoothed - plain) > 0.05
    # validation scores in eval mode whatever mode the model is in
    assert weighted_mean_loss(task.loss, task.weight, net.train(), [batch], torch.device("cpu"), None) == pytest.approx(plain.item(), abs=1e-5)
    assert net.training
    with pytest.raises(UserError, match="label_smoothing must be in"):
        tiny_train_config(label_smoothing=1.0)


class _FixedBatches:
    """Micro-batch m of a step is examples [m*B, (m+1)*B) of 8 with very different numbers of targets."""

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(5, 100, (8, 24), generator=g)
        self.labels = self.ids.clone()
        for row, keep in enumerate([1, 2, 20, 23, 3, 2, 15, 1]):  # target tokens per example
            self.labels[row, : 24 - keep] = -100

    def batch(self, source, batch_size, step, micro=0):
        rows = slice(micro * batch_size, (micro + 1) * batch_size)
        return {"input_ids": self.ids[rows], "labels": self.labels[rows]}

    def val_batches(self, source, batch_size, n_batches):
        return []

    def loss(self, model, batch):
        return lm_loss(model(batch["input_ids"]), batch["labels"])

    def weight(self, batch):
        return int((batch["labels"] != -100).sum())


@pytest.mark.parametrize("split", [(4, 2), (2, 4), (1, 8)])
def test_accumulation_averages_over_the_steps_predictions_not_its_micro_batches(split, tokenizer_dir, tmp_path):
    """One step of 8 examples as 1 x 8 or in micro-batches of 4, 2 or 1: the same loss and gradient,
    the mean over the step's 67 target tokens (a mean of micro-batch means weights 1 target as much as 23)."""
    from lmforge.train import fit

    def one_step(batch_size, grad_accum, out):
        torch.manual_seed(0)
        net = Transformer(preset("tiny", vocab_size=100, context_length=32, dropout=0.0))
        cfg = tiny_train_config(max_steps=1, batch_size=batch_size, grad_accum=grad_accum, grad_clip=1e9, log_interval=1,
                                eval_interval=0, warmup_steps=0)
        fit(net, _FixedBatches(), Tokenizer.load(tokenizer_dir), cfg, out, None, None, tokens_per_sample=24, **quiet)
        row = next(r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train")
        return row["loss"], row["grad_norm"]

    whole = one_step(8, 1, tmp_path / "whole")
    assert one_step(*split, tmp_path / "split") == pytest.approx(whole, rel=1e-5)


def test_which_objectives_share_their_micro_batches_equally(tokenizer_dir, data_dir):
    """mlm+nsp's loss adds a mean over masked tokens to a mean over sequences: weighting the step by
    masked tokens would skew the next-sentence gradient (0.75 relative in review), so it keeps equal
    shares. Causal windows all predict batch_size x seq_len tokens: equal shares are what counting
    them gives, without the count (or, across processes, an all-reduce every step)."""
    from lmforge.train.distributed import World
    from lmforge.train.loop import _shares

    tok = Tokenizer.load(tokenizer_dir)
    bert = TINY_BERT.replace(vocab_size=tok.vocab_size, type_vocab_size=2)
    assert not Objective("mlm+nsp", bert, tok, seed=0).token_weighted
    assert Objective("mlm", bert, tok, seed=0).token_weighted
    assert _shares([1, 1], World(), torch.device("cpu")) == [0.5, 0.5] and _shares([3, 1], World(), torch.device("cpu")) == [0.75, 0.25]
    causal = Objective("causal", preset("tiny", vocab_size=tok.vocab_size), tok, seed=0)
    windows = causal.open(data_dir, "train", 32)
    counts = [causal.weight(causal.batch(windows, 4, step=0, micro=m)) for m in range(3)]
    assert not causal.token_weighted and counts == [4 * 32] * 3
    assert _shares(counts, World(), torch.device("cpu")) == [1 / 3] * 3


@pytest.mark.parametrize("name", ["mlm", "mlm+nsp"])
def test_mlm_validation_batches_are_the_same_whatever_the_training_seed(name, data_dir):
    """Runs with different --train.seed score the same masked positions, so their validation losses compare;
    their training batches do differ."""
    tok = Tokenizer.load(data_dir)
    bert = TINY_BERT.replace(vocab_size=tok.vocab_size, type_vocab_size=2)
    one, other = (Objective(name, bert, tok, seed=s) for s in (7, 8))
    windows = one.open(str(data_dir), "val", 64)
    a, b = one.val_batches(windows, 4, 3), other.val_batches(windows, 4, 3)
    assert len(a) == len(b) == 3 and all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in x)
    assert not torch.equal(one.batch(windows, 4, 0)["labels"], other.batch(windows, 4, 0)["labels"])


def test_resume_with_another_objective_is_refused_before_training(data_dir, tmp_path):
    """Seen in review: an `mlm` run resumed with `--objective mlm+nsp` trained on silently, and its
    metrics.jsonl joined two losses that do not compare."""
    train = tiny_train_config(max_steps=2, eval_interval=0, log_interval=1)
    pretrain(data_dir, tmp_path / "run", TINY_BERT, train, objective="mlm", **quiet)
    rows = (tmp_path / "run" / "metrics.jsonl").read_text()
    with pytest.raises(UserError, match=r"step-000002 was trained with --objective mlm, this run asks for mlm\+nsp; "
                                        r"resume with --objective mlm"):
        pretrain(data_dir, tmp_path / "run", TINY_BERT, train.replace(max_steps=4), objective="mlm+nsp", resume=True, **quiet)
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == rows  # nothing trained
    assert pretrain(data_dir, tmp_path / "run", TINY_BERT, train.replace(max_steps=4), objective="mlm", resume=True,
                    **quiet).step == 4


@pytest.mark.parametrize("chunked", [0, 50])
def test_validation_scores_over_the_real_vocabulary_and_a_plain_step_over_the_padded_head(data_dir, chunked):
    """Validation gives the loss `lmforge eval` and transformers give an exported model (the padding ids take no
    probability); an unsmoothed training step keeps the whole head, whose gradient pushes the padding down."""
    tokenizer = Tokenizer.load(data_dir)
    cfg = preset("tiny", vocab_size=tokenizer.vocab_size - 100, pad_vocab_multiple=256, dropout=0.0)  # 412 -> 512
    torch.manual_seed(0)
    net = Transformer(cfg)
    with torch.no_grad():
        net.output.weight[cfg.vocab_size:].normal_(0.0, 1.0)  # padding rows that take probability mass
    task = Objective("causal", cfg, tokenizer, seed=0, chunked_loss=chunked)
    batch = task.batch(task.open(str(data_dir), "train", 32), 4, step=0)
    batch = {k: v.clamp(max=cfg.vocab_size - 1) for k, v in batch.items()}  # this smaller vocabulary's ids
    with torch.no_grad():
        logits = net(batch["input_ids"])
        trained, validated = task.loss(net.train(), batch), task.loss(net.eval(), batch)
    torch.testing.assert_close(trained, lm_loss(logits, batch["labels"]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(validated, lm_loss(logits[..., :cfg.vocab_size], batch["labels"]), rtol=1e-5, atol=1e-5)
    assert trained - validated > 0.01
