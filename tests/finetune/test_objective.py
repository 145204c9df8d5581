"""A fine-tuning batch's loss: label smoothing over the real vocabulary, and batches without targets."""

import pytest
import torch
import torch.nn.functional as F

from lmforge.config import preset
from lmforge.finetune.objective import TaskObjective
from lmforge.model import Transformer
from lmforge.model.losses import IGNORE_INDEX


def _net(arch):
    torch.manual_seed(0)
    cfg = preset("tiny", vocab_size=500, dropout=0.0, arch=arch)  # 500 ids, logits padded to 512
    assert cfg.padded_vocab_size == 512
    return Transformer(cfg)


def _batch(arch, g):
    ids, labels = torch.randint(5, 500, (3, 12), generator=g), torch.randint(5, 500, (3, 12), generator=g)
    labels[:, :4] = IGNORE_INDEX  # the prompt (decoder seq2seq) or a user turn (sft)
    batch = {"input_ids": ids, "labels": labels}
    if arch == "encoder-decoder":
        batch |= {"src": torch.randint(5, 500, (3, 9), generator=g), "src_mask": torch.ones(3, 9, dtype=torch.long)}
    return batch


@pytest.mark.parametrize("kind,arch", [("seq2seq", "decoder"), ("sft", "decoder"), ("seq2seq", "encoder-decoder")])
def test_label_smoothing_spreads_over_the_real_vocabulary(kind, arch):
    """torch's smoothed cross-entropy on the 500 real logits (e/500 each), as transformers computes it,
    not on the 512 of the padded head, which would train probability onto ids no text holds."""
    net, batch = _net(arch), _batch(arch, torch.Generator().manual_seed(1))
    task = TaskObjective(kind, arch, pad_id=0, seed=0, label_smoothing=0.1)
    with torch.no_grad():
        memory = {}
        if arch == "encoder-decoder":
            memory = dict(memory=net.encode_source(batch["src"], batch["src_mask"]), memory_mask=batch["src_mask"])
        logits = net(batch["input_ids"], **memory)[..., :500].flatten(0, 1)
        smoothed, plain = task.loss(net.train(), batch), task.loss(net.eval(), batch)
    y = batch["labels"].flatten()
    torch.testing.assert_close(smoothed, F.cross_entropy(logits, y, ignore_index=IGNORE_INDEX, label_smoothing=0.1))
    torch.testing.assert_close(plain, F.cross_entropy(logits, y, ignore_index=IGNORE_INDEX))


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_an_sft_batch_without_assistant_tokens_has_loss_zero_and_weight_zero(smoothing):
    net, batch = _net("decoder"), _batch("decoder", torch.Generator().manual_seed(2))
    batch["labels"][:] = IGNORE_INDEX  # every reply lies past max_length
    task = TaskObjective("sft", "decoder", pad_id=0, seed=0, label_smoothing=smoothing)
    loss = task.loss(net.train(), batch)
    loss.backward()
    assert loss.item() == 0.0 and task.weight(batch) == 0
    assert all(not p.grad.any() for p in net.parameters() if p.grad is not None)


def test_qa_loss_is_the_mean_of_the_start_and_end_cross_entropies():
    """As transformers' *ForQuestionAnswering: (CE(start) + CE(end)) / 2, so its scale (and what
    gradient clipping sees) matches a model fine-tuned there."""
    torch.manual_seed(0)
    net = Transformer(preset("tiny", vocab_size=500, dropout=0.0, task_head="span")).eval()
    ids, mask = torch.randint(5, 500, (3, 12)), torch.ones(3, 12, dtype=torch.long)
    batch = {"input_ids": ids, "attention_mask": mask, "start_positions": torch.tensor([1, 4, 7]),
             "end_positions": torch.tensor([2, 4, 9])}
    with torch.no_grad():
        start, end = net.task_logits(ids, mask).unbind(-1)
        loss = TaskObjective("qa", "decoder", pad_id=0, seed=0).loss(net, batch)
    expected = (F.cross_entropy(start, batch["start_positions"]) + F.cross_entropy(end, batch["end_positions"])) / 2
    torch.testing.assert_close(loss, expected)


def test_a_batch_weighs_what_its_mean_loss_averages_over():
    """Accumulation and validation average micro-batches by these weights: examples for classify and qa,
    labelled tokens for tagging and generation (a tag batch's padding and continuation sub-tokens are not)."""
    labels = torch.tensor([[0, 2, IGNORE_INDEX, 1], [1, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]])
    batch = {"input_ids": torch.zeros(2, 4, dtype=torch.long), "labels": labels}
    assert [TaskObjective(kind, "decoder", 0, 0).weight(batch) for kind in ("classify", "qa", "tag", "seq2seq", "sft")] == [2, 2, 4, 4, 4]


@pytest.mark.parametrize("n_features,batches", [(7, 3), (7, 2), (3, 5)])
def test_validation_takes_the_first_features_in_order_and_none_twice(n_features, batches):
    features = [{"input_ids": [5 + i, 6], "labels": [i, IGNORE_INDEX]} for i in range(n_features)]
    out = TaskObjective("tag", "decoder", 0, 0).val_batches(features, 3, batches)
    seen = [int(x) for b in out for x in b["labels"][:, 0]]
    assert seen == list(range(min(n_features, 3 * batches)))
