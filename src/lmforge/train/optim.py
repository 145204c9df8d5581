"""Optimizers (AdamW; Muon for the blocks' matrices with AdamW for the rest) and the learning-rate schedule."""

from __future__ import annotations

import math
import sys

import torch
from torch import nn

from lmforge.config import TrainConfig
from lmforge.model.blocks import MLP, CrossAttention, SelfAttention


def _is_dtensor(t: torch.Tensor) -> bool:
    """Whether `t` is one of FSDP2's sharded tensors. Asked without importing torch.distributed.tensor
    (about a second, which `generate`, `eval` and `serve` need not pay; a training run loads it anyway,
    through torch._dynamo): a process that holds a DTensor has already imported it."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def param_groups(model: nn.Module, weight_decay: float, exclude: set[int] = frozenset()) -> list[dict]:
    """AdamW groups: decay on weight matrices only; never on norms, biases or embeddings.

    Embeddings are excluded by module type, not by name, so a tied output head (which is the
    embedding matrix) is not decayed either. Parameters whose id is in `exclude` are left out.
    """
    no_decay_ids = {
        id(p) for m in model.modules() if isinstance(m, (nn.Embedding, nn.LayerNorm, nn.RMSNorm)) for p in m.parameters(recurse=False)
    }
    decay, no_decay = [], []
    seen: set[int] = set(exclude)
    for p in model.parameters():  # parameters() yields a tied tensor once
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (no_decay if id(p) in no_decay_ids or p.dim() < 2 else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def hidden_matrices(model: nn.Module) -> list[nn.Parameter]:
    """The trainable weight matrices of the blocks' linear layers: what Muon updates.

    Embeddings, output heads, task heads, norms and biases are not in the blocks' `nn.Linear`
    weights, so they stay with AdamW (as in Muon's reference: its update is for hidden layers).
    LoRA adapters are not `nn.Linear` weights either, and a frozen base weight has no gradient.
    """
    blocks = [*getattr(model, "layers", ()), *getattr(model, "encoder_layers", ())]
    found: dict[int, nn.Parameter] = {}
    for block in blocks:
        for m in block.modules():
            if isinstance(m, nn.Linear) and m.weight.requires_grad and m.weight.dim() == 2:
                found.setdefault(id(m.weight), m.weight)
    return list(found.values())


def fused_rows(model: nn.Module) -> dict[int, list[int]]:
    """Row blocks of the fused weights, by parameter id: q/k/v of `qkv`, k/v of a cross-attention's
    `kv`, gate/up of a SwiGLU `fc`. Each block is a matrix of its own (the reference Muon
    orthogonalises q, k and v separately), so Muon treats it as one."""
    rows: dict[int, list[int]] = {}
    for m in model.modules():
        if isinstance(m, SelfAttention):
            rows[id(m.qkv.weight)] = [m.n_head * m.head_size] + [m.n_kv_head * m.head_size] * 2
        elif isinstance(m, CrossAttention):
            rows[id(m.kv.weight)] = [m.kv.weight.size(0) // 2] * 2
        elif isinstance(m, MLP) and m.kind == "swiglu":
            rows[id(m.fc.weight)] = [m.fc.weight.size(0) // 2] * 2
    return rows


def build_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    if cfg.optim == "muon":
        hidden = hidden_matrices(model)
        groups = param_groups(model, cfg.weight_decay, exclude={id(p) for p in hidden})
        # One Muon group per row split (whole matrices; q/k/v; gate/up). The loop sets every group's
        # lr from the schedule; Muon's groups scale it by muon_lr / lr.
        blocks = fused_rows(model)
        by_split: dict[tuple[int, ...], list[nn.Parameter]] = {}
        for p in hidden:
            by_split.setdefault(tuple(blocks.get(id(p), ())), []).append(p)  # () is the whole matrix
        for split, params in sorted(by_split.items(), key=lambda kv: (len(kv[0]), kv[0])):
            groups.append({"params": params, "use_muon": True, "rows": list(split), "lr_scale": cfg.muon_lr / cfg.lr,
                           "weight_decay": 0.0})
        return Muon([g for g in groups if g["params"]], lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), momentum=cfg.muon_momentum)
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


# ------------------------------------------------------------------------------------------ Muon
# Quintic Newton-Schulz coefficients of Muon (Jordan et al. 2024, https://kellerjordan.github.io/posts/muon/):
# chosen to maximise the slope at zero, so that 5 steps push every singular value into about
# [0.7, 1.2] instead of converging to exactly 1.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def newton_schulz(g: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """Approximately orthogonalise a matrix, or each of a stack (..., rows, cols): U S V^T -> U S' V^T,
    S' in about [0.7, 1.2].

    Runs in bf16 on CUDA (as the reference; the iteration is robust to it) and fp32 elsewhere.
    Works on the wide orientation (rows <= cols), so that X X^T is the smaller Gram matrix.
    """
    a, b, c = NS_COEFFICIENTS
    x = g.bfloat16() if g.is_cuda else g.float()
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + eps)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.mT if tall else x


class Muon(torch.optim.Optimizer):
    """Muon on the groups marked `use_muon`, AdamW on the others: one optimizer, one state dict.

    Muon step for a matrix W with gradient G (the reference's, with Nesterov momentum):

        M <- beta M + (1 - beta) G;    U <- (1 - beta) G + beta M
        W <- W - lr * lr_scale * max(1, rows / cols)^0.5 * NewtonSchulz5(U)

    A Muon group's `rows` (default: the whole matrix) cuts a fused weight into row blocks that are
    orthogonalised and scaled each on its own, as if they were separate matrices (q, k, v).

    The AdamW groups follow `torch.optim.AdamW` (decoupled weight decay, bias correction).
    A group's effective learning rate is lr * lr_scale, so a schedule that sets every group's
    `lr` moves both kinds in proportion.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        momentum: float = 0.95,
        ns_steps: int = 5,
    ) -> None:
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, momentum=momentum, ns_steps=ns_steps,
                        use_muon=False, lr_scale=1.0, rows=None)
        super().__init__(params, defaults)
        for group in self.param_groups:
            if group["use_muon"] and any(p.dim() != 2 for p in group["params"]):
                raise ValueError("Muon updates 2-D matrices only; give other parameters to an AdamW group")
            if group["use_muon"] and group["rows"] and any(sum(group["rows"]) != p.size(0) for p in group["params"]):
                raise ValueError(f"a Muon group's rows {group['rows']} must add up to each matrix's row count")

    def __setstate__(self, state: dict) -> None:
        """Groups loaded from a state_dict get the defaults of keys they lack, as torch's own optimizers do:
        `set_optimizer_state_dict(full_state_dict=True)` (a resume under torchrun) drops a group's
        empty `rows` list, the whole-matrix group's."""
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr = group["lr"] * group["lr_scale"]
            params = [p for p in group["params"] if p.grad is not None]
            if group["use_muon"]:
                self._muon(params, lr, group)
            else:
                self._adamw(params, lr, group)
        return loss

    def _muon(self, params: list[torch.Tensor], lr: float, group: dict) -> None:
        beta = group["momentum"]
        blocks: list[tuple[torch.Tensor, ...]] = []
        for p in params:
            state = self.state[p]
            if not state:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            buf = state["momentum_buffer"]
            buf.lerp_(p.grad, 1 - beta)
            nesterov = torch.lerp(p.grad, buf, beta)  # look ahead along M
            if _is_dtensor(nesterov):
                # FSDP2 holds a shard of rows; Newton-Schulz needs the whole matrix. Every rank
                # gathers it and orthogonalises the same thing, then keeps its own rows below.
                nesterov = nesterov.full_tensor()
            blocks.append(nesterov.split(group["rows"]) if group["rows"] else (nesterov,))
        # Blocks of one shape are orthogonalised together: one batched iteration, not one per matrix.
        by_shape: dict[torch.Size, list[tuple[int, int]]] = {}
        for i, bs in enumerate(blocks):
            for j, b in enumerate(bs):
                by_shape.setdefault(b.shape, []).append((i, j))
        updates = [list(bs) for bs in blocks]
        for (rows, cols), where in by_shape.items():
            ortho = newton_schulz(torch.stack([blocks[i][j] for i, j in where]), group["ns_steps"])
            ortho = ortho * max(1.0, rows / cols) ** 0.5
            for k, (i, j) in enumerate(where):
                updates[i][j] = ortho[k]
        for p, ups in zip(params, updates):
            update = (torch.cat(ups) if len(ups) > 1 else ups[0]).to(p.dtype)
            if _is_dtensor(p):  # the whole update, cut to this rank's shard (no communication)
                from torch.distributed.tensor import DTensor, Replicate

                mesh = p.device_mesh
                update = DTensor.from_local(update, mesh, [Replicate()] * mesh.ndim, run_check=False).redistribute(mesh, p.placements)
            if group["weight_decay"]:
                p.mul_(1 - lr * group["weight_decay"])
            p.add_(update, alpha=-lr)

    def _adamw(self, params: list[torch.Tensor], lr: float, group: dict) -> None:
        """torch.optim.AdamW's update (decoupled decay, bias correction) on a list of tensors at once."""
        if not params:
            return
        for p in params:
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["step"] += 1
        beta1, beta2 = group["betas"]
        states = [self.state[p] for p in params]
        grads = [p.grad for p in params]
        m, v = [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states]
        torch._foreach_mul_(params, 1 - lr * group["weight_decay"])
        torch._foreach_lerp_(m, grads, 1 - beta1)
        torch._foreach_mul_(v, beta2)
        torch._foreach_addcmul_(v, grads, grads, value=1 - beta2)
        denom = torch._foreach_sqrt(v)
        torch._foreach_div_(denom, [math.sqrt(1 - beta2 ** s["step"]) for s in states])
        torch._foreach_add_(denom, group["eps"])
        torch._foreach_addcdiv_(params, m, denom, [-lr / (1 - beta1 ** s["step"]) for s in states])
