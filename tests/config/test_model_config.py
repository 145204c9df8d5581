"""ModelConfig refuses settings that would build a different model than asked, or NaNs, in one line."""

import json

import numpy as np
import pytest

from lmforge.config import FINETUNE_DEFAULTS, PRESETS, LoraConfig, ModelConfig, TrainConfig, preset
from lmforge.utils.errors import UserError

BASE = dict(vocab_size=50, context_length=16, n_layer=1, n_head=2, n_embd=16)
ROTARY = dict(BASE, position="rotary")


@pytest.mark.parametrize(
    "over, key",
    [
        (dict(mlp_hidden=0), "mlp_hidden"),  # was silently 4 * n_embd
        (dict(mlp_hidden=-4), "mlp_hidden"),  # was a negative-dimension RuntimeError
        (dict(arch="encoder-decoder", n_encoder_layer=0), "n_encoder_layer"),  # was silently n_layer
        (dict(arch="encoder-decoder", n_encoder_layer=-1), "n_encoder_layer"),  # was an encoder of no layers
        (dict(type_vocab_size=-1), "type_vocab_size"),
        (dict(n_kv_head=0), "n_kv_head"),  # would be read as "unset": multi-head where grouped-query was asked for
        (dict(norm_eps=0.0), "norm_eps"),
        (dict(norm_eps=-1.0), "norm_eps"),  # was non-finite logits
        (dict(ROTARY, rope_theta=0.0), "rope_theta"),  # were NaN rotary tables
        (dict(ROTARY, rope_theta=-1.0), "rope_theta"),
        (dict(ROTARY, rope_scaling="linear", rope_factor=0.0), "rope_factor"),
        (dict(ROTARY, rope_scaling="llama3", rope_factor=-8.0), "rope_factor"),
        (dict(ROTARY, rope_scaling="llama3", rope_low_freq_factor=4.0, rope_high_freq_factor=1.0), "rope_low_freq_factor"),
        (dict(ROTARY, rope_scaling="llama3", rope_low_freq_factor=4.0, rope_high_freq_factor=4.0), "rope_low_freq_factor"),
        (dict(ROTARY, n_head=8, rope_scaling="ntk", rope_factor=2.0), "ntk"),  # head size 2: was ZeroDivisionError
    ],
)
def test_impossible_settings_are_one_line(over, key):
    with pytest.raises(UserError, match=key) as e:
        ModelConfig(**{**BASE, **over})
    assert "\n" not in str(e.value)


def test_default_and_explicit_sizes_still_build():
    assert ModelConfig(**BASE).hidden_size == 64
    assert ModelConfig(**BASE, mlp_hidden=24).hidden_size == 24
    ModelConfig(**ROTARY, rope_scaling="llama3", rope_factor=8.0, rope_low_freq_factor=1.0, rope_high_freq_factor=4.0)
    ModelConfig(**{**ROTARY, "n_head": 4}, rope_scaling="ntk", rope_factor=2.0)  # head size 4


@pytest.mark.parametrize(
    "over, key",
    [
        ({"lora": "yes"}, "model.lora"),
        ({"lora": [4]}, "model.lora"),
        ({"lora": {"r": "4"}}, "model.lora.r"),
        ({"lora": {"r": 2.5}}, "model.lora.r"),
        ({"lora": {"r": True}}, "model.lora.r"),
        ({"lora": {"r": 4, "alpha": "8"}}, "model.lora.alpha"),
        ({"lora": {"r": 4, "targets": ["q", "v"]}}, "model.lora.targets"),
        ({"task_head": "classify", "labels": "pos"}, "model.labels"),  # was 3 labels p, o, s
        ({"task_head": "classify", "labels": 5}, "model.labels"),
        ({"task_head": "classify", "labels": ["a", 1]}, "model.labels"),
    ],
)
def test_from_dict_checks_the_lora_block_and_labels(over, key):
    with pytest.raises(UserError, match=key.replace(".", r"\.")) as e:
        ModelConfig.from_dict({**BASE, **over})
    assert "\n" not in str(e.value)


def test_from_dict_still_reads_good_lora_and_labels():
    cfg = ModelConfig.from_dict({**BASE, "task_head": "tag", "labels": ["O", "B"], "lora": {"r": 4, "alpha": 8}})
    assert cfg.num_labels == 2 and cfg.lora.r == 4 and cfg.lora.scale == 2.0
    assert ModelConfig.from_dict({**BASE, "lora": None, "labels": None}).lora is None


def test_llama_1b_is_the_llama_3_2_1b_preset():
    assert PRESETS["llama-1b"] is PRESETS["llama-3.2-1b"]
    assert preset("llama-1b", vocab_size=10).replace(preset=None) == preset("llama-3.2-1b", vocab_size=10).replace(preset=None)


def _float_fields(cls):
    import dataclasses

    return [f.name for f in dataclasses.fields(cls) if f.type in ("float", "float | None")]


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_every_float_field_refuses_nan_and_inf_in_one_line_naming_it(value):
    """A range check is a comparison, and every comparison with nan is False: nan passed them all (seen in
    review: lr nan a torch traceback, min_lr nan trained, weight_decay nan failed after training)."""
    from lmforge.config import LoraConfig, TrainConfig

    cases = [(TrainConfig, {}, "train"), (LoraConfig, {"r": 4}, "lora"), (ModelConfig, ROTARY, "model")]
    for cls, base, prefix in cases:
        names = _float_fields(cls)
        assert names, cls
        for name in names:
            with pytest.raises(UserError, match=rf"{prefix}\.{name} must be a finite number, got {value}") as e:
                cls(**{**base, name: value})
            assert "\n" not in str(e.value)
    # An int field given a float from a YAML file (a sweep grid's train) is caught too.
    with pytest.raises(UserError, match=r"train\.max_steps is nan; it must be int"):
        TrainConfig(max_steps=float("nan"))
    with pytest.raises(UserError, match=r"model\.lora\.alpha|lora\.alpha"):
        ModelConfig.from_dict({**BASE, "lora": {"r": 4, "alpha": float("inf")}})


@pytest.mark.parametrize("field, limit, base", [
    ("context_length", 2**24, BASE), ("rope_original_context", 2**24, BASE), ("n_layer", 2**16, BASE),
    ("n_encoder_layer", 2**16, dict(BASE, arch="encoder-decoder")), ("mlp_hidden", 2**20, BASE),
    ("vocab_size", 2**32, BASE), ("type_vocab_size", 2**16, BASE), ("pad_vocab_multiple", 2**16, BASE),
])
def test_sizes_above_their_bound_are_one_line_and_the_bound_itself_is_taken(field, limit, base):
    """Seen in review: 2**63 - 1 in these fields ended in torch's "Storage size calculation overflowed" or a
    TypeError (Overflow when unpacking long long); such a model could never be built anyway."""
    for value in (limit + 1, 2**63 - 1, 10**20):
        with pytest.raises(UserError, match=rf"^model\.{field} must be <= {limit:,}, got {value:,}$"):
            ModelConfig(**{**base, field: value})
    assert getattr(ModelConfig(**{**base, field: limit}), field) == limit  # a config only: nothing is allocated


def test_n_embd_above_its_bound_is_one_line():
    with pytest.raises(UserError, match=r"^model\.n_embd must be <= 1,048,576, got 9,223,372,036,854,775,808$"):
        ModelConfig(**{**BASE, "n_embd": 2**63})
    assert ModelConfig(**{**BASE, "n_embd": 2**20}).n_embd == 2**20


@pytest.mark.parametrize("scaling", ["ntk", "linear", "llama3"])
def test_rope_theta_and_factor_are_bounded_so_the_rotary_tables_stay_finite(scaling):
    """Seen in review: `--model.rope_scaling ntk --model.rope_factor 1e300` was an OverflowError in the rotary tables."""
    rotary = dict(ROTARY, n_head=4, rope_scaling=scaling)  # head size 4: ntk raises the base to factor^2
    with pytest.raises(UserError, match=r"^model\.rope_factor must be <= 1e\+06, got 1e\+300$"):
        ModelConfig(**rotary, rope_factor=1e300)
    with pytest.raises(UserError, match=r"^model\.rope_theta must be <= 1e\+15, got 1e\+300$"):
        ModelConfig(**rotary, rope_theta=1e300)
    from lmforge.model.blocks import rope_inv_freq

    import torch

    widest = ModelConfig(**rotary, rope_theta=1e15, rope_factor=1e6)
    assert torch.isfinite(rope_inv_freq(widest)).all()


@pytest.mark.parametrize("field, limit", [("max_steps", 2**53), ("batch_size", 2**20), ("grad_accum", 2**20),
                                          ("eval_batches", 2**20), ("seq_len", 2**24), ("threads", 4096)])
def test_train_sizes_above_their_bound_are_one_line(field, limit):
    """Seen in review: `--train.batch_size 9223372036854775807` was a numpy ValueError."""
    from lmforge.config import TrainConfig

    for value in (limit + 1, 2**63 - 1):
        with pytest.raises(UserError, match=rf"^train\.{field} must be <= {limit:,}, got {value:,}$"):
            TrainConfig(**{field: value})
    assert getattr(TrainConfig(**{field: limit}), field) == limit


@pytest.mark.parametrize("alpha", [0.0, -16.0])
def test_lora_alpha_must_be_positive(alpha):
    """Seen in review: `--lora.r 2 --lora.alpha 0` scaled the adapters by 0, so only the head learnt."""
    from lmforge.config import LoraConfig

    with pytest.raises(UserError, match=rf"^lora\.alpha must be > 0 .*got {alpha}$"):
        LoraConfig(r=2, alpha=alpha)
    with pytest.raises(UserError, match=r"lora\.alpha must be > 0"):  # and in a checkpoint's config.json
        ModelConfig.from_dict({**BASE, "lora": {"r": 2, "alpha": alpha}})
    assert LoraConfig(r=2, alpha=1e-3).scale == 5e-4


@pytest.mark.parametrize("build, message", [
    (lambda: ModelConfig(n_layer="2"), "model.n_layer is '2'; it must be int"),
    (lambda: preset("tiny", dropout="0.1"), "model.dropout is '0.1'; it must be float"),
    (lambda: preset("tiny", task_head="classify", labels="0,1"), "model.labels is '0,1'; it must be a list of label names"),
    (lambda: TrainConfig(max_steps="3"), "train.max_steps is '3'; it must be int"),
    (lambda: TrainConfig(max_steps=3.5), "train.max_steps is 3.5; it must be int"),
    (lambda: TrainConfig(max_steps=np.float32(3.5)), "train.max_steps is 3.5; it must be int"),
    (lambda: TrainConfig(lr="1e-3"), "train.lr is '1e-3'; it must be float"),
    (lambda: LoraConfig(r="4"), "lora.r is '4'; it must be int"),
    (lambda: TrainConfig.of({"max_step": 3}), r"unknown train field\(s\) \['max_step'\]"),
    (lambda: TrainConfig.of(3), "train must be a TrainConfig or a dict of its fields, got int"),
])
def test_configs_built_in_python_check_their_types_in_one_line(build, message):
    """Seen in review: from Python these were TypeErrors deep in training, or (labels="0,1") a head of the
    characters '0', ',' and '1' whose checkpoint no verb could open."""
    with pytest.raises(UserError, match=message):
        build()


def test_lora_and_schedule_ranges():
    """lora.dropout 1.0 zeroes every adapter input (LoRA would learn nothing); r=0 is LoRA off, not a
    division by zero at build; a min_lr above lr would make the cosine "decay" climb."""
    with pytest.raises(UserError, match=r"lora\.dropout"):
        LoraConfig(r=4, dropout=1.0)
    assert ModelConfig(**BASE, lora=LoraConfig(r=0)).lora is None
    with pytest.raises(UserError, match="min_lr"):
        TrainConfig(lr=1e-4, min_lr=1e-3)
    assert TrainConfig(lr=1e-4, min_lr=1e-4).min_lr == 1e-4


def test_numpy_scalars_are_taken_as_the_python_values_they_hold():
    """Seen in review: `lr=np.float32(3e-4)` or a step count from a numpy grid was refused as the wrong
    type (and an np.int64 that got through would have broken config.json)."""
    train = TrainConfig(max_steps=np.int64(3), lr=np.float32(0.5), compile=np.bool_(False))
    model = ModelConfig(**{**BASE, "n_layer": np.int32(2)})
    assert (train.max_steps, train.lr, train.compile, model.n_layer) == (3, 0.5, False, 2)
    assert [type(v) for v in (train.max_steps, train.lr, train.compile, model.n_layer)] == [int, float, bool, int]
    json.dumps(train.to_dict()) and json.dumps(model.to_dict())


def test_a_train_dict_sets_fields_over_the_defaults_it_is_given():
    assert TrainConfig.of({"max_steps": 7}) == TrainConfig(max_steps=7)
    assert TrainConfig.of({"max_steps": 7}, FINETUNE_DEFAULTS) == TrainConfig(**{**FINETUNE_DEFAULTS, "max_steps": 7})
    given = TrainConfig(lr=1e-3)
    assert TrainConfig.of(given, FINETUNE_DEFAULTS) is given and TrainConfig.of(None) == TrainConfig()
