"""The blocks every architecture is assembled from: attention, MLP, norms, positions.

Shapes: B batch, T sequence, C = n_embd, nh query heads, nkv key/value heads, hs head size.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.config import ModelConfig
from lmforge.model.cache import KVCache


def sinusoidal_table(n_positions: int, dim: int) -> torch.Tensor:
    """PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(pos / 10000^(2i/d)).

    "Attention Is All You Need", section 3.5. Computed in float64, returned as float32.
    """
    pos = torch.arange(n_positions, dtype=torch.float64)[:, None]
    two_i = torch.arange(0, dim, 2, dtype=torch.float64)
    angle = pos / torch.pow(10000.0, two_i / dim)  # (n_positions, ceil(dim/2))
    table = torch.zeros(n_positions, dim, dtype=torch.float64)
    table[:, 0::2] = torch.sin(angle)
    table[:, 1::2] = torch.cos(angle[:, : dim // 2])
    return table.float()


class SinusoidalPositions(nn.Module):
    def __init__(self, n_positions: int, dim: int) -> None:
        super().__init__()
        # Not a parameter and not saved: it is a function of the config.
        self.register_buffer("table", sinusoidal_table(n_positions, dim), persistent=False)

    def forward(self, pos: torch.Tensor) -> torch.Tensor:
        return self.table[pos]


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """Rotary angular frequencies theta^(-2i/d), i < d/2, after the configured context scaling (float64)."""
    d, theta, factor = config.head_size, config.rope_theta, config.rope_factor
    if config.rope_scaling == "ntk":
        # NTK-aware scaling (bloc97, 2023): stretch low frequencies, keep the highest one.
        theta = theta * factor ** (d / (d - 2))
    inv_freq = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    if config.rope_scaling == "linear":
        inv_freq = inv_freq / factor  # position interpolation (Chen et al. 2023)
    elif config.rope_scaling == "llama3":
        # Llama 3.1: long wavelengths are divided by `factor`, short ones kept, the band between
        # interpolated linearly in original_context / wavelength.
        low, high = config.rope_low_freq_factor, config.rope_high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        smooth = ((config.rope_original_context / wavelen - low) / (high - low)).clamp(0.0, 1.0)
        inv_freq = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    return inv_freq


class Rotary(nn.Module):
    """cos/sin tables for rotary positions, in the "rotate half" layout (pairs (i, i + hs/2))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        angles = torch.arange(config.context_length, dtype=torch.float64)[:, None] * rope_inv_freq(config)[None]
        angles = torch.cat([angles, angles], dim=-1)  # (context, hs)
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def forward(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos[pos], self.sin[pos]  # (T, hs) each


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, nh, T, hs) by position: x * cos + rotate_half(x) * sin."""
    x1, x2 = x.chunk(2, dim=-1)
    return (x * cos + torch.cat([-x2, x1], dim=-1) * sin).type_as(x)


def make_norm(config: ModelConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.n_embd, eps=config.norm_eps)
    return nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)


class SelfAttention(nn.Module):
    """Self-attention through `scaled_dot_product_attention`, causal (decoders) or bidirectional
    (encoders), with an optional padding mask; multi-head, grouped-query
    (n_kv_head < n_head: each key/value head serves n_head / n_kv_head consecutive query heads)
    or multi-query (n_kv_head = 1).

        x ─> qkv ─> q (nh heads) ─┐
                    k (nkv heads) ─┼─> [rotary on q, k] ─> [cache] ─> repeat k, v to nh ─> SDPA ─> proj
                    v (nkv heads) ─┘
    """

    def __init__(self, config: ModelConfig, layer: int, causal: bool = True) -> None:
        super().__init__()
        self.layer = layer
        self.causal = causal
        self.n_head, self.n_kv_head, self.head_size = config.n_head, config.kv_heads, config.head_size
        self.qkv = nn.Linear(config.n_embd, (self.n_head + 2 * self.n_kv_head) * self.head_size, bias=config.bias)
        self.proj = nn.Linear(self.n_head * self.head_size, config.n_embd, bias=config.bias)
        # QK-norm: RMSNorm over the head dimension of queries and keys (one scale shared by the heads).
        self.q_norm = nn.RMSNorm(self.head_size, eps=config.norm_eps) if config.qk_norm else None
        self.k_norm = nn.RMSNorm(self.head_size, eps=config.norm_eps) if config.qk_norm else None
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(
        self,
        x: torch.Tensor,
        cache: KVCache | None = None,
        start: int | torch.Tensor = 0,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`padding_mask` (B, S) is True at the keys that may be attended to (False at padding).
        `start` is the position of x's first token: an int for the whole batch, or a tensor (B,)
        of per-row positions (decoding slots at different lengths; needs `cache`)."""
        B, T, C = x.shape
        hs = self.head_size
        q, k, v = self.qkv(x).split([self.n_head * hs, self.n_kv_head * hs, self.n_kv_head * hs], dim=2)
        q = q.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_kv_head, hs).transpose(1, 2)  # (B, nkv, T, hs)
        v = v.view(B, T, self.n_kv_head, hs).transpose(1, 2)  # (B, nkv, T, hs)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        mask, is_causal = None, self.causal and T > 1
        if cache is not None and isinstance(start, torch.Tensor):
            # Per-row positions (slots of a batch at different lengths): row b's query i sits at
            # start[b] + i and sees cached keys 0..start[b]+i; later keys are stale or unwritten.
            k, v = cache.update(self.layer, start, k, v)  # (B, nkv, max_seq_len, hs)
            mask = cache.attention_mask(start, T)  # (B, 1, T, S), additive
            is_causal = False
        elif cache is not None:
            k, v = cache.update(self.layer, start, k, v)  # (B, nkv, start+T, hs)
            if start > 0 and T > 1:
                # A chunk after cached positions: query i (absolute start+i) sees keys 0..start+i.
                # SDPA's is_causal aligns to the top-left corner, so spell the mask out.
                mask = torch.ones(T, start + T, dtype=torch.bool, device=x.device).tril(diagonal=start)
                is_causal = False
            elif T == 1:
                is_causal = False  # one new query attends to every cached key
        if padding_mask is not None:
            keep = padding_mask[:, None, None, :].bool()  # (B, 1, 1, S)
            if is_causal:
                keep = keep & torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            if mask is None or mask.dtype == torch.bool:
                mask = keep if mask is None else keep & mask
            else:
                mask = mask.masked_fill(~keep, float("-inf"))
            is_causal = False
        if self.n_kv_head != self.n_head:
            k = k.repeat_interleave(self.n_head // self.n_kv_head, dim=1)  # (B, nh, S, hs)
            v = v.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=self.dropout if self.training else 0.0
        )
        y = self.proj(y.transpose(1, 2).contiguous().view(B, T, self.n_head * hs))  # (B, T, C)
        return self.resid_dropout(y) if self.training else y


class CrossAttention(nn.Module):
    """Decoder queries attend to the encoder's output (the "memory"), skipping its padding."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_head, self.head_size = config.n_head, config.head_size
        self.q = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.kv = nn.Linear(config.n_embd, 2 * config.n_embd, bias=config.bias)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, memory_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T, C = x.shape
        S = memory.size(1)
        q = self.q(x).view(B, T, self.n_head, self.head_size).transpose(1, 2)  # (B, nh, T, hs)
        k, v = (t.view(B, S, self.n_head, self.head_size).transpose(1, 2) for t in self.kv(memory).split(C, dim=2))
        mask = memory_mask[:, None, None, :].bool() if memory_mask is not None else None  # (B, 1, 1, S)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        return self.resid_dropout(self.proj(y.transpose(1, 2).contiguous().view(B, T, C)))


class MLP(nn.Module):
    """proj(act(fc(x))) with GELU (GPT), ReLU or ReLU^2 (relu(h)**2, the speedrun); or SwiGLU
    (Shazeer 2020; Llama): proj(silu(gate) * up), with `fc` = [gate; up]."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.kind = config.mlp
        fc_out = 2 * config.hidden_size if config.mlp == "swiglu" else config.hidden_size
        self.fc = nn.Linear(config.n_embd, fc_out, bias=config.bias)
        self.proj = nn.Linear(config.hidden_size, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        if self.kind == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        elif self.kind == "relu2":
            h = F.relu(h).square()
        else:
            h = F.relu(h) if self.kind == "relu" else F.gelu(h, approximate="tanh" if self.kind == "gelu_tanh" else "none")
        h = self.proj(h)
        return self.dropout(h) if self.training else h  # (dropout is the identity in eval: skip the call)


class Block(nn.Module):
    """Residual block. Pre-norm: x + attention(norm(x)), then x + feed_forward(norm(x)).
    Post-norm: norm(x + attention(x)), then norm(x + feed_forward(x)). A decoder block of an
    encoder-decoder has a cross-attention sub-block between the two, in the same style."""

    def __init__(self, config: ModelConfig, layer: int, causal: bool = True, cross: bool = False) -> None:
        super().__init__()
        self.pre_norm = config.norm_position == "pre"
        self.attention_norm = make_norm(config)
        self.attention = SelfAttention(config, layer, causal)
        self.cross_norm = make_norm(config) if cross else None
        self.cross_attention = CrossAttention(config) if cross else None
        self.ffn_norm = make_norm(config)
        self.feed_forward = MLP(config)

    def forward(
        self,
        x: torch.Tensor,
        cache: KVCache | None = None,
        start: int | torch.Tensor = 0,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        padding_mask: torch.Tensor | None = None,
        memory: torch.Tensor | None = None,
        memory_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.pre_norm:
            x = x + self.attention(self.attention_norm(x), cache, start, rope, padding_mask)
            if self.cross_attention is not None:
                x = x + self.cross_attention(self.cross_norm(x), memory, memory_mask)
            return x + self.feed_forward(self.ffn_norm(x))
        x = self.attention_norm(x + self.attention(x, cache, start, rope, padding_mask))
        if self.cross_attention is not None:
            x = self.cross_norm(x + self.cross_attention(x, memory, memory_mask))
        return self.ffn_norm(x + self.feed_forward(x))


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """GPT-2 initialisation: N(0, 0.02) for weights and embeddings, zeros for biases."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, mean=0.0, std=std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, mean=0.0, std=std)


def residual_std(config: ModelConfig, std: float = 0.02) -> float:
    """GPT-2 scales the init of projections into the residual stream by 1/sqrt(2 * n_layer)."""
    return std / math.sqrt(2 * config.n_layer)
