"""Typed configs (dataclasses of plain values) and the preset registry (layer 1)."""

from lmforge.config.model import LoraConfig, ModelConfig
from lmforge.config.presets import PRESETS, preset
from lmforge.config.train import TrainConfig

__all__ = ["LoraConfig", "ModelConfig", "TrainConfig", "PRESETS", "preset"]
