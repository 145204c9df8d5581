"""Named architectures. Each preset is a partial `ModelConfig`; vocab_size comes from the data."""

from __future__ import annotations

from typing import Any

from lmforge.config.model import ModelConfig
from lmforge.utils.errors import UserError

_LLAMA: dict[str, Any] = dict(position="rotary", norm="rmsnorm", mlp="swiglu", bias=False, norm_eps=1e-5)

# The architecture changes of the modded-nanogpt GPT-2 speedrun (Jordan et al. 2024, records of
# Oct-Nov 2024, https://github.com/KellerJordan/modded-nanogpt): rotary positions, QK-norm, ReLU^2,
# RMSNorm, no biases, an untied head, zero-initialised output projections and head, the vocabulary
# padded to a multiple of 128. Later records' extras (value embeddings, U-net skips, logit soft-capping)
# are not modelled. Any shape preset takes them: `preset("tiny", **SPEEDRUN)`.
SPEEDRUN: dict[str, Any] = dict(position="rotary", norm="rmsnorm", qk_norm=True, mlp="relu2", bias=False,
                                tie_embeddings=False, zero_init_proj=True, zero_init_head=True, pad_vocab_multiple=128)

PRESETS: dict[str, dict[str, Any]] = {
    # Builds in milliseconds: what every unit test uses.
    "tiny": dict(context_length=64, n_layer=2, n_head=4, n_embd=64),
    # What `lmforge demo` trains on a laptop CPU in about two minutes.
    "demo": dict(context_length=128, n_layer=4, n_head=4, n_embd=128, dropout=0.0),
    # GPT-2 shapes (Radford et al. 2019, table 2) with its tanh-approximate GELU.
    "gpt2-124m": dict(context_length=1024, n_layer=12, n_head=12, n_embd=768, mlp="gelu_tanh"),
    "gpt2-350m": dict(context_length=1024, n_layer=24, n_head=16, n_embd=1024, mlp="gelu_tanh"),
    "gpt2-774m": dict(context_length=1024, n_layer=36, n_head=20, n_embd=1280, mlp="gelu_tanh"),
    # The GPT-2 124M shape with the speedrun's changes; 6 heads of 128 as in modded-nanogpt.
    "gpt2-124m-speedrun": dict(SPEEDRUN, context_length=1024, n_layer=12, n_head=6, n_embd=768),
    "gpt2-1.5b": dict(context_length=1024, n_layer=48, n_head=25, n_embd=1600, mlp="gelu_tanh"),
    # Llama family: rotary positions, RMSNorm, SwiGLU, no biases (shapes from the released config.json files).
    "llama-2-7b": dict(_LLAMA, context_length=4096, n_layer=32, n_head=32, n_embd=4096, mlp_hidden=11008,
                       tie_embeddings=False),
    "llama-3-8b": dict(_LLAMA, context_length=8192, n_layer=32, n_head=32, n_kv_head=8, n_embd=4096,
                       mlp_hidden=14336, rope_theta=500000.0, tie_embeddings=False),
    "llama-3.2-1b": dict(_LLAMA, context_length=131072, n_layer=16, n_head=32, n_kv_head=8, n_embd=2048,
                         mlp_hidden=8192, rope_theta=500000.0, rope_scaling="llama3", rope_factor=32.0,
                         rope_original_context=8192),
    "smollm2-135m": dict(_LLAMA, context_length=8192, n_layer=30, n_head=9, n_kv_head=3, n_embd=576,
                         mlp_hidden=1536, rope_theta=100000.0),
    # BERT-base (Devlin et al. 2018): a post-norm bidirectional encoder with segments, MLM and NSP heads.
    "bert-base": dict(arch="encoder", context_length=512, n_layer=12, n_head=12, n_embd=768, mlp_hidden=3072,
                      norm_position="post", embed_norm=True, type_vocab_size=2, norm_eps=1e-12),
    # "Attention Is All You Need" (Vaswani et al. 2017, table 3): post-norm, ReLU, sinusoidal positions,
    # embeddings shared by encoder, decoder and output and scaled by sqrt(d_model).
    "transformer-base": dict(arch="encoder-decoder", context_length=256, n_layer=6, n_encoder_layer=6, n_head=8,
                             n_embd=512, mlp_hidden=2048, mlp="relu", position="sinusoidal", norm_position="post",
                             embed_scale=True, dropout=0.1),
    "transformer-big": dict(arch="encoder-decoder", context_length=256, n_layer=6, n_encoder_layer=6, n_head=16,
                            n_embd=1024, mlp_hidden=4096, mlp="relu", position="sinusoidal", norm_position="post",
                            embed_scale=True, dropout=0.3),
}
PRESETS["llama-1b"] = PRESETS["llama-3.2-1b"]  # the short name DESIGN.md uses


def preset(name: str, **overrides: Any) -> ModelConfig:
    """The `ModelConfig` of preset `name`, with `overrides` applied on top."""
    if name not in PRESETS:
        raise UserError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return ModelConfig(preset=name, **{**PRESETS[name], **overrides})
