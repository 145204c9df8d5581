"""Typed configs (dataclasses of plain values) and the preset registry (layer 1)."""

from lmforge.config.model import ModelConfig
from lmforge.config.presets import PRESETS, preset
from lmforge.config.train import TrainConfig

__all__ = ["ModelConfig", "TrainConfig", "PRESETS", "preset"]
