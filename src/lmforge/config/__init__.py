"""Typed configs (dataclasses of plain values) and the preset registry (layer 1)."""

from lmforge.config.model import LoraConfig, ModelConfig
from lmforge.config.presets import PRESETS, preset
from lmforge.config.train import FINETUNE_DEFAULTS, TrainConfig

__all__ = ["LoraConfig", "ModelConfig", "TrainConfig", "FINETUNE_DEFAULTS", "PRESETS", "preset"]
