"""The architecture as plain values: everything `lmforge.model` needs to build a network.

Choices are strings, not classes, so a config round-trips through `config.json` unchanged.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from lmforge.utils.errors import UserError

Position = Literal["learned", "sinusoidal", "rotary"]
Norm = Literal["layernorm", "rmsnorm"]
MLP = Literal["gelu", "gelu_tanh", "relu", "relu2", "swiglu"]
RopeScaling = Literal["none", "linear", "ntk", "llama3"]
Arch = Literal["decoder", "encoder", "encoder-decoder"]
NormPosition = Literal["pre", "post"]
TaskHead = Literal["none", "classify", "tag", "span"]
# Linear layers LoRA can adapt, by the names PEFT users know: slices of the fused attention
# projections (q, k, v), the attention output (o) and the MLP (gate and up are slices of `fc`).
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
# The Python types a JSON/YAML value may have for each scalar field annotation (an int is a valid float).
_SCALAR_TYPES: dict[str, tuple[type, ...]] = {
    "int": (int,), "int | None": (int, type(None)), "float": (int, float), "bool": (bool,), "bool | None": (bool, type(None)),
    "str": (str,), "str | None": (str, type(None)),
}


def check_scalar_types(cls: type, d: dict[str, Any], prefix: str) -> None:
    """JSON and YAML values arrive untyped (the CLI's are checked by its parser): one line per wrong type.

    A numpy scalar (an `np.int64` from a grid, an `np.float32` learning rate) becomes the Python value
    it holds, in `d`, so that config.json can write it."""
    for f in dataclasses.fields(cls):
        kinds = _SCALAR_TYPES.get(str(f.type))
        value = d.get(f.name, f.default)
        if kinds and isinstance(value, np.generic):
            value = d[f.name] = value.item()
        if kinds and (not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds)):
            raise UserError(f"{prefix}.{f.name} is {value!r}; it must be {f.type}")


def is_label_list(value: Any) -> bool:
    """Whether `value` is a list (or tuple) of label names: not a string, whose characters would be the labels."""
    return isinstance(value, (list, tuple)) and all(isinstance(label, str) for label in value)


def check_finite(config: Any, prefix: str) -> None:
    """Refuse nan and inf in any field of a config dataclass: every range check after this one is a
    comparison, and a comparison with nan is False, so nan would pass them all."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"{prefix}.{f.name} must be a finite number, got {value}; set it to a number")


@dataclass
class LoraConfig:
    """Low-rank adapters (Hu et al. 2021): W x + (alpha / r) * B A dropout(x), with A (r, in), B (out, r).

    Args:
        r: rank of the adapters; 0 turns LoRA off.
        alpha: scale numerator; the update is multiplied by alpha / r.
        dropout: dropout on the adapters' input.
        targets: comma-separated from q, k, v, o, gate, up, down, or `all-linear` (every linear
            layer of the blocks; never embeddings or output heads).
    """

    r: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    targets: str = "q,v"

    def __post_init__(self) -> None:
        check_scalar_types(type(self), vars(self), "lora")
        check_finite(self, "lora")
        if self.r < 0:
            raise UserError(f"lora.r must be >= 0, got {self.r}")
        if self.alpha <= 0:  # the update is scaled by alpha / r: 0 would train only the head, < 0 flips the update
            raise UserError(f"lora.alpha must be > 0 (the adapters' update is scaled by alpha / r), got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        bad = [t for t in self.target_list if t not in LORA_TARGETS]
        if bad:
            raise UserError(f"lora.targets {bad} unknown; use names from {list(LORA_TARGETS)} or all-linear")

    def check_adapts(self, mlp: str) -> None:
        """Refuse, for a new fine-tune, targets that adapt no layer: it would silently train only the
        head. Not part of __post_init__, so that a checkpoint written before this check still loads."""
        if not self.target_list:
            raise UserError(f"lora.targets is empty; name some of {list(LORA_TARGETS)} or all-linear")
        # A non-gated MLP has one `fc` (all `up`): a `gate` adapter would match no layer.
        if mlp != "swiglu" and self.targets.strip() != "all-linear" and "gate" in self.target_list:
            raise UserError(f"lora.targets 'gate' needs model.mlp swiglu (this model's mlp is {mlp}); use up or down")

    @property
    def target_list(self) -> tuple[str, ...]:
        if self.targets.strip() == "all-linear":
            return LORA_TARGETS
        return tuple(t.strip() for t in self.targets.split(",") if t.strip())

    @property
    def scale(self) -> float:
        return self.alpha / self.r


@dataclass
class ModelConfig:
    """A Transformer as plain values. GPT-2 (learned positions, LayerNorm, GELU, biases), the Llama
    family (rotary positions, RMSNorm, SwiGLU, grouped-query attention, no biases) and BERT (a
    bidirectional post-norm encoder with token types and MLM/NSP heads) are settings of the same fields.

    Args:
        preset: name the values came from (`tiny`, `gpt2-124m`, ...); informational once resolved.
        arch: `decoder` (causal attention, next-token head), `encoder` (bidirectional attention,
            masked-LM head, pooler and next-sentence head, as BERT) or `encoder-decoder` (the original
            Transformer: a bidirectional encoder, a causal decoder with cross-attention, embeddings
            shared by both and by the output head).
        n_encoder_layer: encoder blocks of an encoder-decoder; None means n_layer (which counts the
            decoder blocks).
        vocab_size: tokens the tokenizer produces; None means "take it from the training data".
        context_length: the longest sequence the model attends over (nanoGPT's block_size).
        n_layer: number of Transformer blocks.
        n_head: attention (query) heads per block.
        n_kv_head: key/value heads; None means n_head (multi-head), 1 is multi-query, between is
            grouped-query attention.
        n_embd: width of the residual stream.
        mlp_hidden: width of the MLP's hidden layer; None means 4 * n_embd.
        position: `learned` (GPT-2), `sinusoidal` ("Attention Is All You Need", section 3.5) or
            `rotary` (RoPE, Su et al. 2021, applied to queries and keys).
        rope_theta: RoPE base.
        rope_scaling: `none`, `linear` (positions divided by rope_factor), `ntk` (NTK-aware: the
            base grows by rope_factor^(d/(d-2))) or `llama3` (Llama 3.1's frequency-band rule).
        rope_factor: context extension factor of the scaling.
        rope_low_freq_factor: llama3 scaling: wavelengths above original_context/low go fully scaled.
        rope_high_freq_factor: llama3 scaling: wavelengths below original_context/high stay unscaled.
        rope_original_context: llama3 scaling: the context the model was pretrained with.
        norm: `layernorm` or `rmsnorm`.
        norm_position: `pre` (x + f(norm(x)), with a final norm; GPT-2, Llama) or `post`
            (norm(x + f(x)); the original Transformer, BERT).
        embed_norm: a norm right after the embeddings (BERT).
        type_vocab_size: number of token types (segments) with their own embedding; 0 for none.
        mlp: `gelu` (exact), `gelu_tanh` (GPT-2's approximation), `relu` (the original Transformer),
            `relu2` (ReLU squared, So et al. 2021 "Primer"; the modded-nanogpt speedrun) or `swiglu` (Llama).
        qk_norm: RMSNorm over each head's queries and keys (learned scale per channel, shared by the
            heads), before rotary; keeps attention logits bounded (Dehghani et al. 2023; the speedrun).
        zero_init_proj: initialise the attention and MLP output projections to zero, so that every
            block starts as the identity (the speedrun; instead of GPT-2's 1/sqrt(2 n_layer) scaling).
        zero_init_head: initialise an untied output head to zero (the speedrun): the first logits are
            uniform. Needs tie_embeddings false.
        embed_scale: multiply token embeddings by sqrt(n_embd) ("Attention Is All You Need", 3.4).
        bias: biases in linear layers and LayerNorms.
        dropout: dropout on embeddings, attention weights and residual branches.
        tie_embeddings: share the token embedding with the output head.
        norm_eps: epsilon of the norms.
        pad_vocab_multiple: embedding rows are padded to a multiple of this (faster matmuls).
        task_head: a fine-tuning head on the final hidden states: `classify` (one label per
            sequence: from the pooled [CLS] state for encoders, the last real token for decoders),
            `tag` (one label per token) or `span` (start/end logits for extractive QA); `none`.
        labels: the label names of a `classify` or `tag` head, in logit order.
        lora: low-rank adapters on the blocks' linear layers (None: none).
    """

    preset: str | None = None
    arch: Arch = "decoder"
    vocab_size: int | None = None
    context_length: int = 1024
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    n_kv_head: int | None = None
    n_encoder_layer: int | None = None
    mlp_hidden: int | None = None
    position: Position = "learned"
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = "none"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_context: int = 8192
    norm: Norm = "layernorm"
    norm_position: NormPosition = "pre"
    embed_norm: bool = False
    type_vocab_size: int = 0
    embed_scale: bool = False
    mlp: MLP = "gelu"
    qk_norm: bool = False
    zero_init_proj: bool = False
    zero_init_head: bool = False
    bias: bool = True
    dropout: float = 0.0
    tie_embeddings: bool = True
    norm_eps: float = 1e-5
    pad_vocab_multiple: int = 64
    task_head: TaskHead = "none"
    labels: list[str] | None = None
    lora: LoraConfig | None = None

    def __post_init__(self) -> None:
        check_scalar_types(type(self), vars(self), "model")  # ModelConfig(n_layer="2") in Python: not a TypeError later
        check_finite(self, "model")
        if self.labels is not None and not is_label_list(self.labels):
            raise UserError(f"model.labels is {self.labels!r}; it must be a list of label names or null")
        for name in ("context_length", "n_layer", "n_head", "n_embd", "pad_vocab_multiple"):
            if getattr(self, name) < 1:
                raise UserError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise UserError(
                f"model.n_embd ({self.n_embd}) must be divisible by model.n_head ({self.n_head}); "
                "change one of them"
            )
        for name in ("n_kv_head", "n_encoder_layer", "mlp_hidden"):  # None means the default; 0 is not "default"
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise UserError(f"model.{name} must be >= 1 (or null for the default), got {getattr(self, name)}")
        # Far above any real model, and low enough that no tensor's size overflows int64 (a TypeError or
        # "Storage size calculation overflowed" deep in torch); what fits in memory pretrain checks.
        limits = {"context_length": 2**24, "rope_original_context": 2**24, "n_layer": 2**16, "n_encoder_layer": 2**16,
                  "n_embd": 2**20, "mlp_hidden": 2**20, "vocab_size": 2**32, "type_vocab_size": 2**16,
                  "pad_vocab_multiple": 2**16}
        for name, limit in limits.items():
            if getattr(self, name) is not None and getattr(self, name) > limit:
                raise UserError(f"model.{name} must be <= {limit:,}, got {getattr(self, name):,}")
        if self.type_vocab_size < 0:
            raise UserError(f"model.type_vocab_size must be >= 0 (0 for no token types), got {self.type_vocab_size}")
        if self.norm_eps <= 0:  # x / sqrt(mean(x^2) + eps): a negative eps is NaN, 0 is inf on a zero row
            raise UserError(f"model.norm_eps must be > 0, got {self.norm_eps}")
        if self.n_head % self.kv_heads:
            raise UserError(
                f"model.n_head ({self.n_head}) must be a multiple of model.n_kv_head ({self.n_kv_head}); change one of them"
            )
        if self.position == "rotary":
            if self.head_size % 2:
                raise UserError(f"rotary positions need an even head size, got {self.head_size}; change n_embd or n_head")
            # theta^x and 1/factor: the rotary tables are NaN otherwise.
            # Upper bounds keep ntk's theta * factor^(d/(d-2)) (d >= 4: at most factor^2) a finite float.
            for name, limit in (("rope_theta", 1e15), ("rope_factor", 1e6)):
                if getattr(self, name) <= 0:
                    raise UserError(f"model.{name} must be > 0, got {getattr(self, name)}")
                if getattr(self, name) > limit:
                    raise UserError(f"model.{name} must be <= {limit:g}, got {getattr(self, name):g}")
            if self.rope_scaling == "ntk" and self.head_size <= 2:  # the base grows by factor^(d/(d-2))
                raise UserError(f"rope_scaling ntk needs a head size > 2, got {self.head_size}; change n_embd or n_head")
            # Llama 3.1 interpolates between the two bands; low >= high reverses which band is scaled.
            if self.rope_scaling == "llama3" and not 0 < self.rope_low_freq_factor < self.rope_high_freq_factor:
                raise UserError(
                    f"llama3 rope scaling needs 0 < model.rope_low_freq_factor < model.rope_high_freq_factor, "
                    f"got {self.rope_low_freq_factor} and {self.rope_high_freq_factor}"
                )
            if self.rope_scaling == "llama3" and self.rope_original_context < 1:
                raise UserError(f"model.rope_original_context must be >= 1, got {self.rope_original_context}")
        if self.zero_init_head and self.tie_embeddings:
            raise UserError("model.zero_init_head needs an untied head (a tied head is the embedding); set --model.tie_embeddings false")
        if self.vocab_size is not None and self.vocab_size < 1:
            raise UserError(f"model.vocab_size must be >= 1, got {self.vocab_size}")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"model.dropout must be in [0, 1), got {self.dropout}")
        if self.task_head in ("classify", "tag") and not self.labels:
            raise UserError(f"a {self.task_head} head needs labels; pass the label set of the task")
        if isinstance(self.lora, dict):  # from config.json
            unknown = sorted(set(self.lora) - {f.name for f in dataclasses.fields(LoraConfig)})
            if unknown:
                raise UserError(f"unknown model.lora key(s) {unknown}; valid keys are r, alpha, dropout, targets")
            self.lora = LoraConfig(**self.lora)
        if self.lora is not None and self.lora.r == 0:
            self.lora = None
        choices = (("arch", Arch), ("position", Position), ("norm", Norm), ("norm_position", NormPosition),
                   ("mlp", MLP), ("rope_scaling", RopeScaling), ("task_head", TaskHead))
        for name, allowed in choices:
            if getattr(self, name) not in allowed.__args__:
                raise UserError(
                    f"model.{name}={getattr(self, name)!r} is not supported; use one of {list(allowed.__args__)}"
                )

    @property
    def num_labels(self) -> int:
        return 2 if self.task_head == "span" else len(self.labels or ())

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def hidden_size(self) -> int:
        return 4 * self.n_embd if self.mlp_hidden is None else self.mlp_hidden

    @property
    def padded_vocab_size(self) -> int:
        if self.vocab_size is None:
            raise UserError("model.vocab_size is not set; pass --model.vocab_size or train on prepared data")
        m = self.pad_vocab_multiple
        return -(-self.vocab_size // m) * m

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], origin: str | None = None) -> "ModelConfig":
        """The config of `d`; `origin`, the file it was read from (a checkpoint's config.json), is named
        in the error of a key this version does not know."""
        if not isinstance(d, dict):
            raise UserError(f"a model config must map field names to values, got a {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown and origin is not None:  # a file: most likely written by a newer lmforge, else edited by hand
            raise UserError(f"{origin}: unknown model config key(s) {unknown} (written by a newer lmforge? upgrade "
                            f"lmforge to load it; a typo? the valid keys are {sorted(names)})")
        if unknown:
            raise UserError(
                f"unknown model config key(s) {unknown}; valid keys are {sorted(names)}"
            )
        lora = d.get("lora")  # the scalar fields and labels are checked by __post_init__
        if lora is not None and not isinstance(lora, dict):
            raise UserError(f"model.lora is {lora!r}; it must be a mapping of r, alpha, dropout, targets or null")
        if lora is not None:
            check_scalar_types(LoraConfig, lora, "model.lora")
        return cls(**d)

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)
