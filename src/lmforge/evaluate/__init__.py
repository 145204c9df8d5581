"""Evaluation workflows (layer 4)."""

from lmforge.evaluate.lm import evaluate_lm

__all__ = ["evaluate_lm"]
