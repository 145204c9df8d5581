"""Typed configs (dataclasses of plain values) and the preset registry (layer 1)."""

from lmforge.config.model import LoraConfig, ModelConfig
from lmforge.config.presets import PRESETS, preset
from lmforge.config.train import (
    DEFAULT_DOC_STRIDE,
    DEFAULT_PROMPT,
    FINETUNE_DEFAULTS,
    INFERENCE_DEFAULTS,
    INFERENCE_TASKS,
    TrainConfig,
)

__all__ = ["LoraConfig", "ModelConfig", "TrainConfig", "FINETUNE_DEFAULTS", "DEFAULT_PROMPT", "DEFAULT_DOC_STRIDE", "INFERENCE_DEFAULTS", "INFERENCE_TASKS", "PRESETS",
           "preset"]
