"""Training workflows (layer 4): the pretraining loop, optimizer, schedule and run metrics."""

from lmforge.train.pretrain import RunResult, pretrain

__all__ = ["RunResult", "pretrain"]
