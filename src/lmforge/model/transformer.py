"""The Transformer, assembled from `blocks`: decoder-only (GPT, Llama), encoder-only (BERT) or
encoder-decoder (the original Transformer).

    tokens ─> token (+ position) (+ type) embedding ─> [norm] ─> dropout ─> [Block] x n_layer ─> [norm]
          ─> decoder: output ─> next-token logits
          ─> encoder: mlm ─> masked-token logits;  pooler([CLS]) ─> nsp ─> is-next logits
    encoder-decoder: source ─> encode_source ─> memory; target ─> decoder blocks (self + cross attention) ─> output
    task head (fine-tuning): classify ([CLS] via pooler, or a decoder's last real token) | tag (every token) | span (start, end)
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator

import torch
from torch import nn

from lmforge.config import ModelConfig
from lmforge.model.blocks import Block, Rotary, SinusoidalPositions, init_weights, make_norm, residual_std
from lmforge.model.cache import KVCache
from lmforge.model.lora import add_lora


# torch.nn.init's fills, which `Transformer.unfilled` skips.
_FILLS = ("normal_", "uniform_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_", "xavier_normal_",
          "trunc_normal_", "zeros_", "ones_", "constant_")
_skipping = threading.Lock()
_skippers = 0  # threads inside `_no_fills`
_kept_fills: dict[str, object] = {}


@contextlib.contextmanager
def _no_fills() -> Iterator[None]:
    """torch.nn.init's fills are no-ops inside, process-wide. The first thread in keeps the real ones and
    the last one out puts them back: a thread that saved and restored what it found could keep another
    thread's no-ops, and every model built afterwards would start from uninitialised memory."""
    global _skippers
    with _skipping:
        if _skippers == 0:
            _kept_fills.update({name: getattr(nn.init, name) for name in _FILLS})
            for name in _FILLS:
                setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
        _skippers += 1
    try:
        yield
    finally:
        with _skipping:
            _skippers -= 1
            if _skippers == 0:
                for name, fill in _kept_fills.items():
                    setattr(nn.init, name, fill)


class MLMHead(nn.Module):
    """BERT's masked-LM head: dense, GELU, norm, then the (tied) vocabulary projection with a bias."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.n_embd, config.n_embd)
        self.norm = make_norm(config)
        self.decoder = nn.Linear(config.n_embd, config.padded_vocab_size)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.norm(torch.nn.functional.gelu(self.dense(h))))


class Pooler(nn.Module):
    """BERT's pooler: tanh(dense(hidden state of the first ([CLS]) token))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.n_embd, config.n_embd)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(h[:, 0]))


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
        self.type_embeddings = nn.Embedding(config.type_vocab_size, config.n_embd) if config.type_vocab_size else None
        self.embed_norm = make_norm(config) if config.embed_norm else None
        self.dropout = nn.Dropout(config.dropout)
        seq2seq = config.arch == "encoder-decoder"
        # Post-norm blocks end normalised already; pre-norm stacks need a final norm.
        pre = config.norm_position == "pre"
        if seq2seq:
            n_enc = config.n_encoder_layer or config.n_layer
            self.encoder_layers = nn.ModuleList(Block(config, i, causal=False) for i in range(n_enc))
            self.encoder_norm = make_norm(config) if pre else None
        causal = config.arch != "encoder"
        self.layers = nn.ModuleList(Block(config, i, causal=causal, cross=seq2seq) for i in range(config.n_layer))
        self.norm = make_norm(config) if pre else None
        if config.arch != "encoder":
            self.output = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
            head = self.output
        else:
            self.mlm = MLMHead(config)
            self.pooler = Pooler(config)
            self.nsp = nn.Linear(config.n_embd, 2)
            head = self.mlm.decoder
        if config.tie_embeddings:
            head.weight = self.tok_embeddings.weight
        # A fine-tuning head: labels for a classify/tag head, (start, end) for a span head.
        self.head = nn.Linear(config.n_embd, config.num_labels) if config.task_head != "none" else None
        self.apply(init_weights)
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=residual_std(config))
        if config.zero_init_proj:  # every block starts as the identity (modded-nanogpt)
            for block in [*self.layers, *getattr(self, "encoder_layers", [])]:
                for sub in (block.attention, block.cross_attention, block.feed_forward):
                    if sub is not None:
                        nn.init.zeros_(sub.proj.weight)
        if config.zero_init_head:  # untied (checked by the config): uniform first predictions
            nn.init.zeros_(head.weight)
        if config.lora is not None:
            add_lora(self, config)

    def forward(
        self,
        idx: torch.Tensor,
        cache: KVCache | None = None,
        start: int | torch.Tensor = 0,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        memory: torch.Tensor | None = None,
        memory_mask: torch.Tensor | None = None,
        return_hidden: bool = False,
    ) -> torch.Tensor:
        """Logits (B, T, padded_vocab_size): next-token for decoders, masked-token for encoders.

        An encoder-decoder decodes `idx` against `memory`, the output of `encode_source`, whose
        padding `memory_mask` marks (1 = real token). With `return_hidden`, the final hidden states
        (B, T, C) instead: for a loss that applies the head itself (`chunked_lm_loss`), through the
        same (compiled, distributed) forward call as the logits.
        """
        h = self.encode(idx, cache, start, attention_mask, token_type_ids, memory, memory_mask)
        if return_hidden:
            return h
        return self.mlm(h) if self.config.arch == "encoder" else self.output(h)

    def encode_source(self, src: torch.Tensor, src_mask: torch.Tensor | None = None) -> torch.Tensor:
        """An encoder-decoder's encoder: memory (B, S, C) for source tokens (B, S)."""
        if self.config.arch != "encoder-decoder":
            raise ValueError("encode_source belongs to encoder-decoder models")
        if src.size(1) > self.config.context_length:  # the position tables end there
            raise ValueError(f"source of {src.size(1)} tokens exceeds the context of {self.config.context_length}")
        pos = torch.arange(src.size(1), device=src.device)
        x = self.dropout(self._embed(src, pos))
        rope = self.rotary(pos) if self.rotary is not None else None
        for block in self.encoder_layers:
            x = block(x, rope=rope, padding_mask=src_mask)
        return self.encoder_norm(x) if self.encoder_norm is not None else x

    def _embed(self, idx: torch.Tensor, pos: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        x = self.tok_embeddings(idx)  # (B, T, C)
        if self.config.embed_scale:
            x = x * self.config.n_embd**0.5
        if self.pos_embeddings is not None:
            x = x + self.pos_embeddings(pos)
        if self.type_embeddings is not None:
            x = x + self.type_embeddings(token_type_ids if token_type_ids is not None else torch.zeros_like(idx))
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        return x

    def encode(
        self,
        idx: torch.Tensor,
        cache: KVCache | None = None,
        start: int | torch.Tensor = 0,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        memory: torch.Tensor | None = None,
        memory_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final hidden states (B, T, C) for tokens `idx` (B, T) at positions start..start+T-1.

        `start` is an int, or a tensor (B,) of per-row first positions when `cache` holds slots
        at different lengths (continuous batching; see `KVCache.update`).

        `attention_mask` (B, T) is 1 for real tokens and 0 for padding; `token_type_ids` (B, T)
        are segment ids for models with type embeddings (0 when not given).
        """
        B, T = idx.shape
        if self.config.arch == "encoder-decoder" and memory is None:
            raise ValueError("an encoder-decoder decodes against memory: pass memory=model.encode_source(src)")
        if isinstance(start, torch.Tensor):
            # Per-row positions (B, T); the caller (an engine over cache slots) keeps them in the context.
            pos = start[:, None] if T == 1 else start[:, None] + torch.arange(T, device=idx.device)
        else:
            if start + T > self.config.context_length:
                raise ValueError(f"sequence of {start + T} tokens exceeds the context of {self.config.context_length}")
            pos = torch.arange(start, start + T, device=idx.device)
        x = self._embed(idx, pos, token_type_ids)
        x = self.dropout(x) if self.training else x
        rope = self.rotary(pos) if self.rotary is not None else None
        if rope is not None and pos.dim() == 2:
            rope = (rope[0][:, None], rope[1][:, None])  # (B, 1, T, hs): broadcast over heads
        for block in self.layers:
            x = block(x, cache, start, rope, attention_mask, memory, memory_mask)
        return self.norm(x) if self.norm is not None else x

    def task_logits(
        self, idx: torch.Tensor, attention_mask: torch.Tensor | None = None, token_type_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The task head's logits for tokens `idx` (B, T) with `attention_mask` (B, T), 1 on real tokens:
        classify (B, n_labels); tag (B, T, n_labels); span (B, T, 2), start and end logits. lmforge pads on
        the right; left padding works as well where positions are rotary (learned or sinusoidal ones would
        count the padding, as in transformers without position_ids)."""
        if self.head is None:
            raise ValueError("this model has no task head (config.task_head is none)")
        h = self.encode(idx, attention_mask=attention_mask, token_type_ids=token_type_ids)
        if self.config.task_head == "classify":
            if self.config.arch == "encoder":
                h = self.pooler(h)  # BERT: tanh(dense([CLS]))
            else:  # a causal model has seen the whole text only at its last real token
                T = idx.size(1)
                if attention_mask is None:
                    last = torch.full_like(idx[:, 0], T - 1)
                else:  # the last position the mask holds, with the padding on either side (as transformers does)
                    last = ((attention_mask != 0) * torch.arange(1, T + 1, device=idx.device)).argmax(dim=1)
                h = h[torch.arange(idx.size(0), device=idx.device), last]  # (B, C)
        return self.head(self.dropout(h))

    def nsp_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Next-sentence logits (B, 2) from an encoder's hidden states: index 0 = "B follows A"."""
        return self.nsp(self.pooler(hidden))

    def new_cache(self, batch_size: int, max_seq_len: int | None = None) -> KVCache:
        c = self.config
        p = self.tok_embeddings.weight
        return KVCache(
            c.n_layer, batch_size, max_seq_len or c.context_length, c.kv_heads, c.head_size,
            device=p.device, dtype=p.dtype,
        )

    @classmethod
    def unfilled(cls, config: ModelConfig) -> Transformer:
        """A model whose weights are allocated but not initialised, to load every one of them from a file:
        the random fills are most of a load (3 of 4 s for a 135M model on a CPU). As transformers'
        `no_init_weights` does, torch.nn.init's fills are no-ops while it builds, for other threads too."""
        with _no_fills():
            return cls(config)

    def num_params(self, exclude_positions: bool = True, trainable_only: bool = False) -> int:
        """Parameters (those that train, with `trainable_only`), counting tied weights once; learned
        positions excluded as in Kaplan et al. 2020."""
        positions = self.pos_embeddings.weight if exclude_positions and isinstance(self.pos_embeddings, nn.Embedding) else None
        return sum(p.numel() for p in self.parameters() if p is not positions and (p.requires_grad or not trainable_only))

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token: 6N + 12 * attention layers * n_head * head_size * seq_len (Kaplan et al.
        2020; PaLM app. B). An encoder-decoder's attention layers are the encoder's, the decoder's and its
        cross-attention, with source and target both taken as seq_len long."""
        c = self.config
        attention = c.n_layer  # the blocks' self-attention
        if c.arch == "encoder-decoder":
            attention += c.n_layer + (c.n_encoder_layer or c.n_layer)  # cross-attention; the encoder's
        return 6 * self.num_params() + 12 * attention * c.n_head * c.head_size * (seq_len or c.context_length)
