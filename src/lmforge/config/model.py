"""The architecture as plain values: everything `lmforge.model` needs to build a network.

Choices are strings, not classes, so a config round-trips through `config.json` unchanged.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from lmforge.utils.errors import UserError

Position = Literal["learned", "sinusoidal"]
Norm = Literal["layernorm"]
MLP = Literal["gelu"]


@dataclass
class ModelConfig:
    """A decoder-only Transformer (GPT family).

    Args:
        preset: name the values came from (`tiny`, `gpt2-124m`, ...); informational once resolved.
        vocab_size: tokens the tokenizer produces; None means "take it from the training data".
        context_length: the longest sequence the model attends over (nanoGPT's block_size).
        n_layer: number of Transformer blocks.
        n_head: attention heads per block.
        n_embd: width of the residual stream.
        mlp_hidden: width of the MLP's hidden layer; None means 4 * n_embd.
        position: `learned` (GPT-2) or `sinusoidal` ("Attention Is All You Need", section 3.5).
        norm: `layernorm`.
        mlp: `gelu`.
        bias: biases in linear layers and norms.
        dropout: dropout on embeddings, attention weights and residual branches.
        tie_embeddings: share the token embedding with the output head.
        norm_eps: epsilon of the norms.
        pad_vocab_multiple: embedding rows are padded to a multiple of this (faster matmuls).
    """

    preset: str | None = None
    vocab_size: int | None = None
    context_length: int = 1024
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    mlp_hidden: int | None = None
    position: Position = "learned"
    norm: Norm = "layernorm"
    mlp: MLP = "gelu"
    bias: bool = True
    dropout: float = 0.0
    tie_embeddings: bool = True
    norm_eps: float = 1e-5
    pad_vocab_multiple: int = 64

    def __post_init__(self) -> None:
        for name in ("context_length", "n_layer", "n_head", "n_embd", "pad_vocab_multiple"):
            if getattr(self, name) < 1:
                raise UserError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise UserError(
                f"model.n_embd ({self.n_embd}) must be divisible by model.n_head ({self.n_head}); "
                "change one of them"
            )
        if self.vocab_size is not None and self.vocab_size < 1:
            raise UserError(f"model.vocab_size must be >= 1, got {self.vocab_size}")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"model.dropout must be in [0, 1), got {self.dropout}")
        for name, allowed in (("position", Position), ("norm", Norm), ("mlp", MLP)):
            if getattr(self, name) not in allowed.__args__:
                raise UserError(
                    f"model.{name}={getattr(self, name)!r} is not supported; use one of {list(allowed.__args__)}"
                )

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    @property
    def hidden_size(self) -> int:
        return self.mlp_hidden or 4 * self.n_embd

    @property
    def padded_vocab_size(self) -> int:
        if self.vocab_size is None:
            raise UserError("model.vocab_size is not set; pass --model.vocab_size or train on prepared data")
        m = self.pad_vocab_multiple
        return -(-self.vocab_size // m) * m

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise UserError(
                f"unknown model config key(s) {unknown}; valid keys are {sorted(names)}"
            )
        return cls(**d)

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)
