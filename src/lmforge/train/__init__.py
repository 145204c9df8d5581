"""Training workflows (layer 4): the shared training loop (`fit`), pretraining, optimizer, schedule and run metrics."""

from lmforge.train.loop import Interrupted, RunResult, fit
from lmforge.train.objectives import OBJECTIVE_ARCH, weighted_mean_loss
from lmforge.train.pretrain import pretrain

__all__ = ["OBJECTIVE_ARCH", "Interrupted", "RunResult", "fit", "pretrain", "weighted_mean_loss"]
