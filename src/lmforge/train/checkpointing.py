"""The step checkpoints of one run directory: where a run resumes from, and saves that keep the newest few."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from torch import nn

from lmforge.checkpoint import Checkpoint, find_checkpoints, load_checkpoint, save_checkpoint
from lmforge.config import ModelConfig
from lmforge.tokenizer import Tokenizer
from lmforge.utils.errors import UserError


class Checkpointer:
    def __init__(self, run_dir: Path, keep: int) -> None:
        self.run_dir, self.keep = run_dir, keep

    def resume_point(self, resume: bool, model_config: ModelConfig) -> Checkpoint | None:
        """The checkpoint to continue from (None for a new run); refuses to mix two runs in one directory."""
        existing = find_checkpoints(self.run_dir)
        if not resume:
            if existing:
                raise UserError(
                    f"{self.run_dir} already holds checkpoints; pass --resume to continue that run or choose another --out"
                )
            return None
        if not existing:
            raise UserError(f"--resume given but {self.run_dir} holds no checkpoint; drop --resume to start a new run")
        ckpt = load_checkpoint(existing[-1])
        if ckpt.model_config != model_config:
            raise UserError(f"the model config differs from the one in {ckpt.path}; resume with the same --model settings")
        return ckpt

    def save(
        self,
        step: int,
        model: nn.Module,
        tokenizer: Tokenizer,
        trainer_state: dict[str, Any],
        optimizer_state: dict[str, Any],
        metrics_file: Path,
    ) -> Path:
        """Write RUN/step-NNNNNN atomically, then delete all but the newest `keep` step checkpoints."""
        path = save_checkpoint(
            self.run_dir / f"step-{step:06d}", model, tokenizer,
            trainer_state={"step": step, **trainer_state}, optimizer_state=optimizer_state, metrics_file=metrics_file,
        )
        for old in find_checkpoints(self.run_dir)[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return path

    def latest(self) -> Path:
        return find_checkpoints(self.run_dir)[-1]
