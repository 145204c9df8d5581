"""Training workflows (layer 4): the shared training loop (`fit`), pretraining, optimizer, schedule and run metrics."""

from lmforge.train.loop import RunResult, fit
from lmforge.train.pretrain import pretrain

__all__ = ["RunResult", "fit", "pretrain"]
