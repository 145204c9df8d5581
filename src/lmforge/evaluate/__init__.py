"""Evaluation workflows (layer 4): language-model loss and bits per byte; task metrics."""

from lmforge.evaluate.lm import evaluate_lm
from lmforge.evaluate.tasks import evaluate_task

__all__ = ["evaluate_lm", "evaluate_task"]
