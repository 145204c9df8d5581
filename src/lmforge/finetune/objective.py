"""How a fine-tuning batch becomes a loss, per task; batches are drawn from in-memory features.

Implements what `lmforge.train.fit` asks of an objective, so fine-tuning runs in the same loop,
with the same checkpoints, logs and resume semantics as pretraining.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.data.features import Feature, collate, sample_batch
from lmforge.model.losses import IGNORE_INDEX, lm_loss, scored_vocab

Batch = dict[str, torch.Tensor]


class TaskObjective:
    def __init__(self, kind: str, arch: str, pad_id: int, seed: int, label_smoothing: float = 0.0) -> None:
        """`label_smoothing` applies while the model is in training mode; validation (eval mode) is plain."""
        self.kind, self.arch, self.pad_id, self.seed = kind, arch, pad_id, seed
        self.label_smoothing = label_smoothing

    def batch(self, features: list[Feature], batch_size: int, step: int, micro: int = 0) -> Batch:
        return sample_batch(features, batch_size, self.seed, step, micro, self.pad_id)

    def val_batches(self, features: list[Feature], batch_size: int, n_batches: int) -> list[Batch]:
        """The first n_batches * batch_size validation features, in order."""
        end = min(len(features), batch_size * n_batches)
        return [collate(features[i : i + batch_size], self.pad_id) for i in range(0, end, batch_size)]

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        eps = self.label_smoothing if model.training else 0.0
        if self.kind in ("classify", "tag", "qa"):
            logits = model.task_logits(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids")).float()
            if self.kind == "classify":
                return F.cross_entropy(logits, batch["labels"], label_smoothing=eps)
            if self.kind == "tag":
                return lm_loss(logits, batch["labels"], label_smoothing=eps)
            start, end = logits.unbind(dim=-1)  # (B, T) each
            return (F.cross_entropy(start, batch["start_positions"], label_smoothing=eps)
                    + F.cross_entropy(end, batch["end_positions"], label_smoothing=eps)) / 2
        V = scored_vocab(model, self.label_smoothing)
        if self.arch == "encoder-decoder":
            memory = model.encode_source(batch["src"], batch["src_mask"])
            logits = model(batch["input_ids"], memory=memory, memory_mask=batch["src_mask"])
            return lm_loss(logits, batch["labels"], label_smoothing=eps, vocab_size=V)
        # seq2seq prompt format, chat SFT
        return lm_loss(model(batch["input_ids"]), batch["labels"], label_smoothing=eps, vocab_size=V)

    def weight(self, batch: Batch) -> int:
        """How many predictions a batch's mean loss averages over."""
        if self.kind in ("classify", "qa"):
            return batch["input_ids"].size(0)
        return int((batch["labels"] != IGNORE_INDEX).sum())
