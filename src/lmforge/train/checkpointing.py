"""The step checkpoints of one run directory: where a run resumes from, and saves that keep the newest few.

Two forms, both written atomically (a temporary directory renamed into place, so a process killed
mid-write leaves only complete step directories behind):

- one process: `model.safetensors` + `optimizer.safetensors` + `trainer_state.json` (the format
  every other stage reads);
- several processes (DDP or FSDP2): the same files, with the weights gathered to rank 0, plus
  `dcp/`, the sharded state that a resume on any world size reads (`lmforge.train.sharded`).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from lmforge.checkpoint import Checkpoint, find_checkpoints, load_checkpoint, load_model, save_checkpoint
from lmforge.checkpoint.store import (
    SHARDED_DIR,
    incomplete_steps,
    lacks,
    load_optimizer_state,
    optimizer_fits,
    resume_fix,
    with_settings_of,
)
from lmforge.config import LoraConfig, ModelConfig, TrainConfig
from lmforge.model import Transformer
from lmforge.tokenizer import Tokenizer
from lmforge.train.distributed import World, barrier
from lmforge.utils.errors import UserError


class Checkpointer:
    def __init__(self, run_dir: Path, keep: int, world: World = World()) -> None:
        self.run_dir, self.keep, self.world = run_dir, keep, world
        self._kept: set[Path] = set()  # old checkpoints that could not be removed: warned of once, not every save
        self._gathered: Transformer | None = None  # rank 0's full copy for model.safetensors

    def resume_point(self, resume: bool, model_config: ModelConfig, tokenizer: Tokenizer, train: TrainConfig,
                     objective: str | None = None) -> Checkpoint | None:
        """The checkpoint to continue from (None for a new run); refuses to mix two runs in one directory,
        or to continue a run on another model, tokenizer or optimizer than the one it was trained with, or
        into a directory holding step-* entries that are not checkpoints (a copy in progress), which the
        run would neither resume from nor be able to save over: refused before any step trains."""
        partial = incomplete_steps(self.run_dir)
        if partial:
            more = f" (and {len(partial) - 1} more step-* entries)" if len(partial) > 1 else ""
            raise UserError(f"{partial[0]} is not a complete checkpoint (it lacks {', '.join(lacks(partial[0]))}){more}; "
                            f"move it out of {self.run_dir} (or let a copy in progress finish), then run again")
        existing = find_checkpoints(self.run_dir)
        if not resume:
            if existing:
                raise UserError(
                    f"{self.run_dir} already holds checkpoints; pass --resume to continue that run or choose another --out"
                )
            return None
        if not existing:
            raise UserError(f"--resume given but {self.run_dir} holds no checkpoint; drop --resume to start a new run")
        fix = resume_fix(existing[-1])
        ckpt = load_checkpoint(existing[-1], fix)
        if not isinstance(ckpt.trainer_state, dict) or "step" not in ckpt.trainer_state:
            raise UserError(f"{ckpt.path} has no trainer state (trainer_state.json), so a run cannot resume from it; "
                            "drop --resume and choose another --out")
        step = ckpt.trainer_state["step"]
        if type(step) is not int or step < 0:  # bool is an int subclass, and no step is True
            raise UserError(f"{ckpt.path / 'trainer_state.json'} holds step {step!r}, not a step number; {fix}")
        if step > train.max_steps:  # training on would train nothing, and end at another step than asked for
            raise UserError(f"{ckpt.path} is already at step {step}; --train.max_steps {train.max_steps} is below it: "
                            f"pass --train.max_steps {step} or more to continue it, or choose another --out for a new run")
        # The tokenizer first: another one's size would also show as another model.vocab_size, whose
        # advice (the same --model settings) would miss the cause.
        if ckpt.tokenizer.sha256 != tokenizer.sha256:  # the same ids would mean other text: a silent mix of two runs
            data = ckpt.trainer_state.get("data")
            raise UserError(f"{ckpt.path} was trained with another tokenizer (sha256 {ckpt.tokenizer.sha256[:12]}) than "
                            f"this run's data (sha256 {tokenizer.sha256[:12]}); resume on the data it was trained on"
                            + (f" ({data})" if isinstance(data, str) else "") + ", or start a new run in another --out")
        if _compared(ckpt.model_config) != _compared(model_config):
            raise UserError(_settings_differ(ckpt, model_config))
        saved_objective = ckpt.trainer_state.get("objective")
        if objective is not None and saved_objective is not None and saved_objective != objective:
            # Another loss on the same weights: metrics.jsonl would join two curves that do not compare.
            raise UserError(f"{ckpt.path} was trained with --objective {saved_objective}, this run asks for {objective}; "
                            f"resume with --objective {saved_objective}, or start a new run in another --out")
        saved_train = ckpt.trainer_state.get("train")
        saved_optim = saved_train.get("optim", "adamw") if isinstance(saved_train, dict) else train.optim
        if saved_optim != train.optim:  # another optimizer's state cannot be loaded into this one
            raise UserError(f"{ckpt.path} was trained with --train.optim {saved_optim}, this run asks for {train.optim}; "
                            f"resume with --train.optim {saved_optim}")
        if self.world.main:  # checkpoints whose write was killed: never complete, never read
            for tmp in self.run_dir.glob(".step-*.tmp"):
                shutil.rmtree(tmp, ignore_errors=True)
        barrier(self.world)
        return ckpt

    def restore(self, ckpt: Checkpoint, net: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device) -> None:
        """Load a checkpoint's weights and optimizer state into `net` (sharded or not) and `optimizer`."""
        if (ckpt.path / SHARDED_DIR).is_dir() or self.world.distributed:
            from lmforge.train import sharded  # torch.distributed.checkpoint: imported only by the runs that use it

            sharded.restore(ckpt, net, optimizer, self.world.distributed)
            return
        loaded, _ = load_model(ckpt.path, device, fix=resume_fix(ckpt.path))
        optim_state = load_optimizer_state(ckpt)
        net.load_state_dict(loaded.state_dict())
        with optimizer_fits(ckpt):
            optimizer.load_state_dict(with_settings_of(optimizer, optim_state))

    def save(
        self,
        step: int,
        net: nn.Module,
        tokenizer: Tokenizer,
        trainer_state: dict[str, Any],
        optimizer: torch.optim.Optimizer,
        metrics_file: Path | None,
    ) -> Path:
        """Write RUN/step-NNNNNN atomically, then delete all but the newest `keep` step checkpoints.

        Every rank calls this; under several processes it is a collective.
        """
        path = self.run_dir / f"step-{step:06d}"
        trainer_state = {"step": step, **trainer_state}
        if not self.world.distributed:
            save_checkpoint(path, net, tokenizer, trainer_state=trainer_state, optimizer_state=optimizer.state_dict(),
                            metrics_file=metrics_file)
        else:
            from lmforge.train import sharded

            self._gathered = sharded.save(path, net, tokenizer, trainer_state, optimizer, metrics_file, self.world,
                                          self._gathered)
        if self.world.main:
            for old in find_checkpoints(self.run_dir)[: -self.keep]:
                # Renamed out of sight first: a kill during the delete leaves no half checkpoint behind.
                trash = old.with_name(f".{old.name}.deleted.tmp")
                try:
                    os.replace(old, trash)
                except OSError as e:  # the new checkpoint is saved: a leftover old one costs disk, not the run
                    if old not in self._kept:
                        self._kept.add(old)
                        tqdm.write(f"lmforge: warning: cannot remove the old checkpoint {old} ({e.strerror}); "
                                   "training goes on, delete it yourself", file=sys.stderr)  # above the progress bar
                    continue
                shutil.rmtree(trash, ignore_errors=True)
        barrier(self.world)
        return path

    def latest(self) -> Path:
        return find_checkpoints(self.run_dir)[-1]


# A fine-tune's model config comes from its base checkpoint and these options, not from --model flags.
_FINETUNE_FLAGS = {"dropout": "--dropout", "labels": "--labels", "task_head": "the task head (--task)"}


def _compared(config: ModelConfig) -> ModelConfig:
    """What must match for a run to resume on `config`: all of it but `preset`, the name its values came
    from, which says nothing once they are resolved (`--model.preset tiny` and tiny's shape spelled out
    build the same model)."""
    return config.replace(preset=None)


def _settings_differ(ckpt: Checkpoint, given_config: ModelConfig) -> str:
    """Why a run cannot resume on `given_config`, naming the options that differ from `ckpt`'s, as the
    verb that trained it spells them (pretrain: --model.*; finetune: --lora.*, --dropout, ...)."""
    saved, given = _compared(ckpt.model_config).to_dict(), _compared(given_config).to_dict()
    differ = [k for k in saved if saved[k] != given.get(k)]
    if not isinstance(ckpt.trainer_state, dict) or "task" not in ckpt.trainer_state:  # a pretraining run
        diff = ", ".join(f"{k} {given[k]!r} (saved: {saved[k]!r})" for k in differ)
        return (f"the model config differs from the one in {ckpt.path}: {diff}; "
                "resume with the same --model settings (e.g. the same --model.preset)")
    off = dataclasses.asdict(LoraConfig())  # no adapters: r 0
    changes, base = [], []
    for k in differ:
        if k == "lora":
            was, now = saved[k] or off, given[k] or off
            changes += [(f"--lora.{f}", now[f], was[f]) for f in was if was[f] != now.get(f)]
        elif k in _FINETUNE_FLAGS:
            changes.append((_FINETUNE_FLAGS[k], given[k], saved[k]))
        else:
            base.append(f"{k} {given[k]!r} (saved: {saved[k]!r})")
    show = lambda v: " ".join(map(str, v)) if isinstance(v, list) else str(v)  # noqa: E731 (as typed on the command line)
    parts = [f"{flag} {show(now)} (saved: {show(was)})" for flag, now, was in changes]
    fixes = [f"{flag} {show(was)}" for flag, _, was in changes]
    if base:
        parts.append("the base checkpoint's " + ", ".join(base))
        fixes.append(f"the base checkpoint {ckpt.trainer_state.get('base', 'it was fine-tuned from')}")
    return (f"the fine-tuning settings differ from those {ckpt.path} was trained with: {'; '.join(parts)}; "
            f"resume with the same settings ({', '.join(fixes)})")
