"""Optimizer and learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from lmforge.config import TrainConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on weight matrices only; never on norms, biases or embeddings.

    Embeddings are excluded by module type, not by name, so a tied output head (which is the
    embedding matrix) is not decayed either.
    """
    no_decay_ids = {
        id(p) for m in model.modules() if isinstance(m, (nn.Embedding, nn.LayerNorm, nn.RMSNorm)) for p in m.parameters(recurse=False)
    }
    decay, no_decay = [], []
    seen: set[int] = set()
    for p in model.parameters():  # parameters() yields a tied tensor once
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (no_decay if id(p) in no_decay_ids or p.dim() < 2 else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay),
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        fused=device.type == "cuda",
    )


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then cosine to min_lr.

    Warmup reaches `lr` on step warmup_steps - 1; the cosine then falls to `min_lr` at max_steps.
    """
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    decay_steps = max(cfg.max_steps - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / decay_steps, 1.0)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)
