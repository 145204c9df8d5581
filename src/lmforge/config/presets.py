"""Named architectures. Each preset is a partial `ModelConfig`; vocab_size comes from the data."""

from __future__ import annotations

from typing import Any

from lmforge.config.model import ModelConfig
from lmforge.utils.errors import UserError

PRESETS: dict[str, dict[str, Any]] = {
    # Builds in milliseconds: what every unit test uses.
    "tiny": dict(context_length=64, n_layer=2, n_head=4, n_embd=64),
    # What `lmforge demo` trains on a laptop CPU in about two minutes.
    "demo": dict(context_length=128, n_layer=4, n_head=4, n_embd=128, dropout=0.0),
    # GPT-2 shapes (Radford et al. 2019, table 2); vocab 50257 when trained on the GPT-2 tokenizer.
    "gpt2-124m": dict(context_length=1024, n_layer=12, n_head=12, n_embd=768),
    "gpt2-350m": dict(context_length=1024, n_layer=24, n_head=16, n_embd=1024),
    "gpt2-774m": dict(context_length=1024, n_layer=36, n_head=20, n_embd=1280),
    "gpt2-1.5b": dict(context_length=1024, n_layer=48, n_head=25, n_embd=1600),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """The `ModelConfig` of preset `name`, with `overrides` applied on top."""
    if name not in PRESETS:
        raise UserError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return ModelConfig(preset=name, **{**PRESETS[name], **overrides})
