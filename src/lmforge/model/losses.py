"""Language-model losses and the units they are reported in."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


# Label of positions that carry no loss (padding, unmasked MLM tokens): cross_entropy's ignore_index.
IGNORE_INDEX = -100


def lm_loss(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = IGNORE_INDEX, label_smoothing: float = 0.0,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """Mean cross-entropy in nats over the targets that are not `ignore_index`; logits (B, T, V), targets (B, T).
    `label_smoothing` e mixes the one-hot target with e/V on every class (Szegedy et al. 2016).
    `vocab_size` keeps only the first logits, the real vocabulary: the model's are padded to
    `padded_vocab_size` with ids no text holds, which smoothing would otherwise train probability onto.
    Without any target (an SFT batch whose replies lie past max_length) the loss is 0 with zero gradient,
    not 0 / 0: such a batch weighs nothing in a step or a validation (its `weight` is 0)."""
    if vocab_size is not None:
        logits = logits[..., :vocab_size]
    total = F.cross_entropy(
        logits.flatten(0, 1).float(), targets.flatten(), ignore_index=ignore_index, label_smoothing=label_smoothing,
        reduction="sum",
    )
    return total / (targets != ignore_index).sum().clamp(min=1)


def scored_vocab(model: nn.Module, label_smoothing: float) -> int | None:
    """The `vocab_size` to give `lm_loss`: the real vocabulary where smoothing (it would train probability
    onto the head's padding ids, which no text holds) and in validation (scored as `lmforge eval` and an
    exported model score it); None in a plain training step, where the gradient pushes the padding's
    logits down and slicing would copy the logits."""
    return model.config.vocab_size if label_smoothing or not model.training else None


def bits_per_byte(loss_nats: float, tokens: int, n_bytes: int) -> float:
    """Tokenizer-independent loss: total bits over the text divided by its UTF-8 bytes."""
    return loss_nats * tokens / (n_bytes * math.log(2))



def chunked_lm_loss(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_tokens: int = 4096,
    ignore_index: int = IGNORE_INDEX, label_smoothing: float = 0.0, vocab_size: int | None = None,
) -> torch.Tensor:
    """`lm_loss(hidden @ weight.T, targets, label_smoothing=..., vocab_size=...)` without the logits of the whole batch.

    hidden (B, T, C) final hidden states, weight (V, C) the output head, targets (B, T). The rows
    are taken `chunk_tokens` at a time: each chunk's logits are made, reduced to its loss and, when
    a gradient is wanted, to its gradients (softmax - one_hot) at once, then freed; peak memory is
    one chunk's fp32 logits instead of the batch's (B * T * V * 4 bytes: 6.6 GB for GPT-2 at 32 x 1024).
    The head's matmul runs in the autocast dtype when autocast is on, as it would in the model.
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    args = (hidden.flatten(0, -2), weight, targets.flatten(), chunk_tokens, ignore_index, label_smoothing, vocab_size)
    if not torch.is_grad_enabled():
        # Evaluation: needs_input_grad would still ask for the head's gradient (the weight is a
        # Parameter), a (V, C) fp32 buffer and a second matmul per chunk that nothing reads.
        return _chunked_loss_and_grads(*args, want_h=False, want_w=False)[0]
    return _ChunkedCrossEntropy.apply(*args)


def _chunked_loss_and_grads(hidden, weight, targets, chunk_tokens, ignore_index, smoothing, vocab_size, want_h, want_w):
    """The mean loss and, where wanted, its gradients with respect to hidden (N, C) and weight (V, C)
    (zero on the rows past `vocab_size`)."""
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    valid_all = targets != ignore_index
    count = valid_all.sum().clamp(min=1)  # no target: loss 0, gradients 0
    w = weight[:vocab_size].to(dtype)  # the real vocabulary's rows (all of them for vocab_size None)
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    grad_h = torch.empty_like(hidden) if want_h else None
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
    for s in range(0, hidden.size(0), chunk_tokens):
        h = hidden[s : s + chunk_tokens].to(dtype)
        y, valid = targets[s : s + chunk_tokens], valid_all[s : s + chunk_tokens]
        logits = (h @ w.T).float()  # (n, V): the only logits alive at a time
        lse = logits.logsumexp(dim=-1)
        y = torch.where(valid, y, 0)
        picked = logits.gather(1, y[:, None]).squeeze(1)
        # target (1 - e) on the label plus e / V on every class: (1 - e) nll + e (lse - mean logit)
        loss = (1 - smoothing) * (lse - picked) + (smoothing * (lse - logits.mean(dim=-1)) if smoothing else 0.0)
        total += (loss * valid).sum()
        if want_h or want_w:
            g = (logits - lse[:, None]).exp_()  # softmax
            if smoothing:
                g -= smoothing / logits.size(1)
            g.scatter_add_(1, y[:, None], torch.full_like(picked[:, None], smoothing - 1.0))
            g = (g * (valid[:, None] / count)).to(dtype)  # d(mean loss) / d(logits)
            if want_h:
                grad_h[s : s + chunk_tokens] = (g @ w).to(hidden.dtype)
            if want_w:
                grad_w[: w.size(0)] += (g.T @ h).float()
    return total / count, grad_h, grad_w


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Forward computes the loss and both gradients chunk by chunk (as Liger's fused linear cross-entropy);
    backward only scales the saved gradients by the incoming one."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_tokens, ignore_index, smoothing, vocab_size):
        loss, grad_h, grad_w = _chunked_loss_and_grads(
            hidden, weight, targets, chunk_tokens, ignore_index, smoothing, vocab_size, *ctx.needs_input_grad[:2]
        )
        ctx.save_for_backward(grad_h, grad_w)
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        return (
            grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None,
            grad_w * grad_out if grad_w is not None else None,
            None, None, None, None, None,
        )
