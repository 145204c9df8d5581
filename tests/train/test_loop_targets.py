"""Steps and validations with micro-batches that predict nothing, and label smoothing over the real
vocabulary (not the head's padding to `padded_vocab_size`) in every pretraining objective."""

import json

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_train_config
from lmforge.config import preset
from lmforge.model import Transformer
from lmforge.model.losses import IGNORE_INDEX, lm_loss
from lmforge.tokenizer import Tokenizer
from lmforge.train import fit
from lmforge.train.objectives import Objective

quiet = dict(progress=False, log=lambda *a: None)


class _SomeEmpty:
    """Micro-batch m of a step is examples [m*B, (m+1)*B) of 4; the first two have no target at all
    (an SFT reply past max_length, an MLM window with nothing masked)."""

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(5, 100, (4, 16), generator=g)
        self.labels = self.ids.clone()
        for row, keep in enumerate([0, 0, 9, 4]):
            self.labels[row, : 16 - keep] = IGNORE_INDEX

    def batch(self, source, batch_size, step, micro=0):
        rows = slice(micro * batch_size, (micro + 1) * batch_size)
        return {"input_ids": self.ids[rows], "labels": self.labels[rows]}

    def val_batches(self, source, batch_size, n_batches):
        return [self.batch(None, batch_size, 0, m) for m in range(4 // batch_size)]

    def loss(self, model, batch):
        return lm_loss(model(batch["input_ids"]), batch["labels"])

    def weight(self, batch):
        return int((batch["labels"] != IGNORE_INDEX).sum())


def _one_step(tokenizer_dir, out, batch_size, grad_accum):
    torch.manual_seed(0)
    net = Transformer(preset("tiny", vocab_size=100, context_length=32, dropout=0.0))
    cfg = tiny_train_config(max_steps=1, batch_size=batch_size, grad_accum=grad_accum, grad_clip=1e9, log_interval=1,
                            eval_interval=1, warmup_steps=0)
    run = fit(net, _SomeEmpty(), Tokenizer.load(tokenizer_dir), cfg, out, None, "val", tokens_per_sample=16, **quiet)
    row = next(r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train")
    return row["loss"], row["grad_norm"], run.val_loss


@pytest.mark.parametrize("split", [(2, 2), (1, 4)])
def test_a_micro_batch_without_targets_weighs_nothing_in_a_step_or_a_validation(split, tokenizer_dir, tmp_path):
    """Split so that whole micro-batches (and validation batches) have no target: the step and the
    validation are those of the 13 targets of the other examples, not nan ("loss is nan at step 1")."""
    whole = _one_step(tokenizer_dir, tmp_path / "whole", 4, 1)
    assert all(torch.isfinite(torch.tensor(v)) for v in whole)
    assert _one_step(tokenizer_dir, tmp_path / "split", *split) == pytest.approx(whole, rel=1e-5)


def _reference(logits, labels, vocab_size, eps):
    return F.cross_entropy(logits[..., :vocab_size].flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX,
                           label_smoothing=eps)


@pytest.mark.parametrize("name,chunked", [("causal", 0), ("causal", 7), ("mlm", 0), ("seq2seq", 0)])
def test_label_smoothing_spreads_over_the_real_vocabulary(name, chunked, tokenizer_dir):
    """A 500-token vocabulary padded to 512 logits: the smoothed training loss is torch's on the 500
    real ones (e/500 on each), and so is the validation loss of a smoothed run."""
    tok = Tokenizer.load(tokenizer_dir)
    model = dict(causal=preset("tiny"), mlm=preset("bert-base", n_layer=2, n_embd=64, n_head=4, mlp_hidden=128, context_length=64),
                 seq2seq=preset("transformer-base", n_layer=1, n_encoder_layer=1, n_embd=64, n_head=4, mlp_hidden=128,
                                context_length=64))[name]
    cfg = model.replace(vocab_size=500, dropout=0.0)
    assert cfg.padded_vocab_size == 512
    torch.manual_seed(0)
    net = Transformer(cfg)
    g = torch.Generator().manual_seed(1)
    ids, labels = torch.randint(5, 500, (3, 12), generator=g), torch.randint(5, 500, (3, 12), generator=g)
    labels[0, :5] = IGNORE_INDEX
    batch = {"input_ids": ids, "labels": labels}
    if name == "mlm":
        batch["token_type_ids"] = torch.zeros_like(ids)
    if name == "seq2seq":
        batch |= {"src": torch.randint(5, 500, (3, 9), generator=g), "src_mask": torch.ones(3, 9, dtype=torch.long)}
    task = Objective(name, cfg, tok, seed=0, parallel_data=name == "seq2seq", chunked_loss=chunked, label_smoothing=0.1)
    with torch.no_grad():
        if name == "seq2seq":
            logits = net(ids, memory=net.encode_source(batch["src"], batch["src_mask"]), memory_mask=batch["src_mask"])
        elif name == "mlm":
            logits = net.mlm(net.encode(ids, token_type_ids=batch["token_type_ids"]))
        else:
            logits = net(ids)
        smoothed, plain = task.loss(net.train(), batch), task.loss(net.eval(), batch)
    torch.testing.assert_close(smoothed, _reference(logits, labels, 500, 0.1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(plain, _reference(logits, labels, 500, 0.0), atol=1e-5, rtol=1e-5)


class _SameBatch:
    """Every micro-batch of every step is the same 4 x 16 batch, every token a target."""

    def __init__(self):
        ids = torch.randint(5, 100, (4, 17), generator=torch.Generator().manual_seed(0))
        self.ids, self.labels = ids[:, :-1], ids[:, 1:]

    def batch(self, source, batch_size, step, micro=0):
        return {"input_ids": self.ids, "labels": self.labels}

    def val_batches(self, source, batch_size, n_batches):
        return []

    def loss(self, model, batch):
        return lm_loss(model(batch["input_ids"]), batch["labels"])

    def weight(self, batch):
        return int((batch["labels"] != IGNORE_INDEX).sum())


def _first_step(tokenizer_dir, out, dropout=0.0, **train):
    """(logged loss, logged grad_norm, norm of the gradient the optimizer stepped with) of a one-step run."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    torch.manual_seed(0)
    net = Transformer(preset("tiny", vocab_size=100, context_length=32, dropout=dropout))
    stepped = []
    hook = register_optimizer_step_pre_hook(lambda opt, args, kwargs: stepped.append(torch.linalg.vector_norm(
        torch.cat([p.grad.flatten() for g in opt.param_groups for p in g["params"] if p.grad is not None])).item()))
    try:
        cfg = tiny_train_config(max_steps=1, batch_size=4, log_interval=1, eval_interval=0, warmup_steps=0, **train)
        fit(net, _SameBatch(), Tokenizer.load(tokenizer_dir), cfg, out, None, None, tokens_per_sample=16, **quiet)
    finally:
        hook.remove()
    row = next(r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train")
    assert len(stepped) == 1
    return row["loss"], row["grad_norm"], stepped[0]


def test_grad_clip_caps_the_norm_the_optimizer_steps_with_and_the_log_keeps_the_unclipped_one(tokenizer_dir, tmp_path):
    """A random tiny model's first gradient has norm > 0.1: --train.grad_clip 0.01 scales it to norm
    0.01 exactly (not to twice that), and grad_norm in metrics.jsonl is still the norm before clipping."""
    _, free_logged, free_stepped = _first_step(tokenizer_dir, tmp_path / "free", grad_clip=1e9)
    _, logged, stepped = _first_step(tokenizer_dir, tmp_path / "clipped", grad_clip=0.01)
    assert free_stepped == pytest.approx(free_logged, rel=1e-5) and free_logged > 0.1
    assert stepped == pytest.approx(0.01, rel=1e-4)
    assert logged == pytest.approx(free_logged, rel=1e-5)


def test_each_micro_batch_of_a_step_draws_its_own_dropout_masks(tokenizer_dir, tmp_path):
    """Accumulating the same batch twice: without dropout the step's loss is that batch's loss; with
    dropout the two micro-batches draw different masks (seeded by (seed, step, micro)), so the step's
    loss is not the one micro-batch 0 gets alone."""
    runs = {(p, accum): _first_step(tokenizer_dir, tmp_path / f"{p}-{accum}", dropout=p, grad_accum=accum, grad_clip=1e9)[0]
            for p in (0.0, 0.2) for accum in (1, 2)}
    assert runs[0.0, 2] == pytest.approx(runs[0.0, 1], rel=1e-6)
    assert runs[0.2, 1] != pytest.approx(runs[0.0, 1], rel=1e-3)  # dropout changes the loss at all
    assert runs[0.2, 2] != pytest.approx(runs[0.2, 1], rel=1e-4)
