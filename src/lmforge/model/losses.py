"""Language-model losses and the units they are reported in."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


# Label of positions that carry no loss (padding, unmasked MLM tokens): cross_entropy's ignore_index.
IGNORE_INDEX = -100


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Mean cross-entropy in nats over the targets that are not `ignore_index`; logits (B, T, V), targets (B, T)."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=ignore_index)


def bits_per_byte(loss_nats: float, tokens: int, n_bytes: int) -> float:
    """Tokenizer-independent loss: total bits over the text divided by its UTF-8 bytes."""
    return loss_nats * tokens / (n_bytes * math.log(2))

