"""The decoder-only Transformer (GPT family), assembled from `blocks`.

    tokens ─> token embedding (+ positions) ─> dropout ─> [Block] x n_layer ─> norm ─> head ─> logits
"""

from __future__ import annotations

import torch
from torch import nn

from lmforge.config import ModelConfig
from lmforge.model.blocks import Block, Rotary, SinusoidalPositions, init_weights, make_norm, residual_std
from lmforge.model.cache import KVCache


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.padded_vocab_size, config.n_embd)
        # Absolute positions are added to the embeddings; rotary ones rotate queries and keys.
        self.pos_embeddings: nn.Module | None = None
        self.rotary: Rotary | None = None
        if config.position == "learned":
            self.pos_embeddings = nn.Embedding(config.context_length, config.n_embd)
        elif config.position == "sinusoidal":
            self.pos_embeddings = SinusoidalPositions(config.context_length, config.n_embd)
        else:
            self.rotary = Rotary(config)
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.norm = make_norm(config)
        self.output = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        if config.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.apply(init_weights)
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=residual_std(config))

    def forward(self, idx: torch.Tensor, cache: KVCache | None = None, start: int = 0) -> torch.Tensor:
        """Logits (B, T, padded_vocab_size) for tokens `idx` (B, T) at positions start..start+T-1."""
        B, T = idx.shape
        if start + T > self.config.context_length:
            raise ValueError(f"sequence of {start + T} tokens exceeds the context of {self.config.context_length}")
        pos = torch.arange(start, start + T, device=idx.device)
        x = self.tok_embeddings(idx)  # (B, T, C)
        if self.pos_embeddings is not None:
            x = x + self.pos_embeddings(pos)
        x = self.dropout(x)
        rope = self.rotary(pos) if self.rotary is not None else None
        for block in self.layers:
            x = block(x, cache, start, rope)
        return self.output(self.norm(x))

    def new_cache(self, batch_size: int, max_seq_len: int | None = None) -> KVCache:
        c = self.config
        p = self.tok_embeddings.weight
        return KVCache(
            c.n_layer, batch_size, max_seq_len or c.context_length, c.kv_heads, c.head_size,
            device=p.device, dtype=p.dtype,
        )

    def num_params(self, exclude_positions: bool = True) -> int:
        """Parameters, counting tied weights once; positions excluded as in Kaplan et al. 2020."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_positions and isinstance(self.pos_embeddings, nn.Embedding):
            n -= self.pos_embeddings.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token: 6N + 12 * n_layer * n_head * head_size * seq_len (Kaplan et al. 2020; PaLM app. B)."""
        c = self.config
        return 6 * self.num_params() + 12 * c.n_layer * c.n_head * c.head_size * (seq_len or c.context_length)
