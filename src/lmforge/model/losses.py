"""Language-model losses and the units they are reported in."""

from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.nn.functional as F

from lmforge.utils.device import autocast


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean next-token cross-entropy in nats; logits (B, T, V), targets (B, T)."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=ignore_index)


def bits_per_byte(loss_nats: float, tokens: int, n_bytes: int) -> float:
    """Tokenizer-independent loss: total bits over the text divided by its UTF-8 bytes."""
    return loss_nats * tokens / (n_bytes * math.log(2))


@torch.no_grad()
def mean_loss(
    model: torch.nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
) -> tuple[float, int]:
    """Token-weighted mean loss (nats) over (inputs, targets) batches, and the number of tokens."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        with autocast(device, amp_dtype):
            logits = model(x)
        total += lm_loss(logits, y).item() * y.numel()
        count += y.numel()
    model.train(was_training)
    return total / max(count, 1), count
