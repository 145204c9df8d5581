"""The step checkpoints of one run directory: where a run resumes from, and saves that keep the newest few.

Two forms, both written atomically (a temporary directory renamed into place, so a process killed
mid-write leaves only complete step directories behind):

- one process: `model.safetensors` + `optimizer.safetensors` + `trainer_state.json` (the format
  every other stage reads);
- several processes (DDP or FSDP2): the same files, with the weights gathered to rank 0, plus
  `dcp/`, a torch.distributed.checkpoint directory of the model and optimizer state written by all
  ranks in parallel, each its own shard. A resume on any world size, one process included, loads
  `dcp/` and lets DCP reshard it; `model.safetensors` is what `lmforge.checkpoint.load_model`, and
  every stage after training, reads. Gathering the weights costs one full copy on rank 0 per save;
  the optimizer state, twice the model's size, stays sharded.

`dcp/` holds pickles (its `.metadata`, and the optimizer's non-tensor values), so it is read with
an unpickler that builds only the classes DCP's metadata is made of and `torch.load(weights_only=True)`:
resuming a checkpoint never runs code from it (DESIGN.md).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import pickle
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import ReadItem
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from tqdm.auto import tqdm

from lmforge.checkpoint import Checkpoint, find_checkpoints, load_checkpoint, load_model, save_checkpoint
from lmforge.checkpoint.store import incomplete_steps, lacks, load_optimizer_state, resume_fix
from lmforge.config import LoraConfig, ModelConfig, TrainConfig
from lmforge.model import Transformer
from lmforge.tokenizer import Tokenizer
from lmforge.train.distributed import World, barrier, broadcast_object
from lmforge.utils.errors import UserError, first_line

SHARDED_DIR = "dcp"


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
        if (ckpt.path / SHARDED_DIR).is_dir():
            sharded = ckpt.path / SHARDED_DIR
            state = {"model": get_model_state_dict(net), "optim": get_optimizer_state_dict(net, optimizer)}
            reader = _SafeReader(sharded)
            try:
                reader.read_metadata()  # alone first, for its own error rather than DCP's retry of per-rank files
                with warnings.catch_warnings():  # one process reading a sharded checkpoint is what we mean
                    warnings.filterwarnings("ignore", message="torch.distributed is disabled")
                    dcp.load(state, storage_reader=reader, planner=_SafePlanner(), no_dist=not self.world.distributed)
            except (Exception, CheckpointException) as e:  # CheckpointException (every rank's error) is a BaseException
                cause = _root_cause(e)
                if isinstance(cause, KeyboardInterrupt):  # Ctrl-C while reading: an interrupt, not a damaged file
                    raise KeyboardInterrupt from None
                if not isinstance(cause, _UNREADABLE) or isinstance(cause, torch.cuda.OutOfMemoryError):
                    raise cause from None  # not the checkpoint's fault (out of memory, a bug): the error itself
                raise UserError(f"{sharded} is unreadable ({first_line(cause)}); {resume_fix(ckpt.path)}") from None
            set_model_state_dict(net, state["model"])
            with _optimizer_fits(ckpt):
                set_optimizer_state_dict(net, optimizer, _with_settings_of(optimizer, state["optim"]))
            return
        loaded, _ = load_model(ckpt.path, device if not self.world.distributed else "cpu", fix=resume_fix(ckpt.path))
        optim_state = load_optimizer_state(ckpt)
        if not self.world.distributed:
            net.load_state_dict(loaded.state_dict())
            with _optimizer_fits(ckpt):
                optimizer.load_state_dict(_with_settings_of(optimizer, optim_state))
            return
        full = StateDictOptions(full_state_dict=True)
        set_model_state_dict(net, loaded.state_dict(), options=full)
        with _optimizer_fits(ckpt):
            optim_state = _keyed_by_name(net, optimizer, _with_settings_of(optimizer, optim_state))
            set_optimizer_state_dict(net, optimizer, optim_state, options=full)

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
            self._save_sharded(path, net, tokenizer, trainer_state, optimizer, metrics_file)
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

    def _save_sharded(self, path: Path, net: nn.Module, tokenizer: Tokenizer, trainer_state: dict[str, Any],
                      optimizer: torch.optim.Optimizer, metrics_file: Path | None) -> None:
        full = get_model_state_dict(net, options=StateDictOptions(full_state_dict=True, cpu_offload=True))  # rank 0 only
        shards = {"model": get_model_state_dict(net), "optim": get_optimizer_state_dict(net, optimizer)}

        told = False  # whether rank 0 has sent the other ranks the directory to write their shards in

        def write_shards(tmp: Path) -> None:
            nonlocal told
            broadcast_object(str(tmp), self.world)
            told = True
            dcp.save(shards, checkpoint_id=str(tmp / SHARDED_DIR))

        if self.world.main:
            try:
                if self._gathered is None:
                    self._gathered = Transformer(net.config)
                self._gathered.load_state_dict(full)
                state = {**trainer_state, "sharded": SHARDED_DIR, "world_size": self.world.size}
                save_checkpoint(path, self._gathered, tokenizer, trainer_state=state, metrics_file=metrics_file, extra=write_shards)
            except BaseException:
                if not told:  # the other ranks wait for the directory: tell them there is none, then fail
                    broadcast_object(None, self.world)
                raise
        else:
            tmp = broadcast_object(None, self.world)
            if tmp is None:
                raise UserError(f"rank 0 could not write {path.name} (its error says why); this rank stops too")
            dcp.save(shards, checkpoint_id=str(Path(tmp) / SHARDED_DIR))

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


def _with_settings_of(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> dict[str, Any]:
    """A saved optimizer state_dict whose param groups carry `optimizer`'s settings (weight decay, betas,
    eps, momentum, lr_scale, fused, ...) instead of the saved ones.

    The optimizer was just built from this run's config, which is what a resumed run trains with (as
    torchtitan and litgpt do): the checkpoint brings the moments and step counts, not the settings.
    They go in before loading, not after it, because `load_state_dict` places each state's `step`
    by its group's `fused` flag (on the parameter's device for the fused AdamW).
    """
    saved = state["param_groups"]
    if len(saved) != len(optimizer.param_groups):  # another layout: torch's load refuses it, in its own words
        return state
    mine = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    return {**state, "param_groups": [{**old, **new} for old, new in zip(saved, mine)]}


def _keyed_by_name(net: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> dict[str, Any]:
    """A one-process optimizer state_dict (keyed by parameter index) keyed by parameter name instead.

    That is the form `set_optimizer_state_dict` shards onto FSDP2 parameters; the index order is the
    order of the parameters in `optimizer`'s groups, which `build_optimizer` makes the same everywhere.
    """
    names = {id(p): n for n, p in net.named_parameters()}
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    return {
        "state": {order[int(i)]: s for i, s in state["state"].items()},
        "param_groups": [{**g, "params": [order[int(i)] for i in g["params"]]} for g in state["param_groups"]],
    }


@contextlib.contextmanager
def _optimizer_fits(ckpt: Checkpoint) -> Iterator[None]:
    """Turn torch's refusal of a saved optimizer state (another group layout, a damaged entry) into one line."""
    try:
        yield
    except (ValueError, KeyError, TypeError, IndexError) as e:
        raise UserError(f"the optimizer state in {ckpt.path} does not fit this run's optimizer ({first_line(e)}); "
                        f"resume with the --train settings the run was trained with, or {resume_fix(ckpt.path)}") from None


# Every global a `dcp/.metadata` that torch.distributed.checkpoint writes for lmforge refers to (found by
# recording what unpickling the metadata of DDP and FSDP2 runs, AdamW and Muon, on torch 2.11 and 2.13
# asks for), besides torch dtypes. Anything else is refused before it is built: a pickle's globals are
# what it can call.
_DCP_GLOBALS = {
    *(("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorStorageMetadata", "BytesStorageMetadata",
        "ChunkStorageMetadata", "TensorProperties", "_MEM_FORMAT_ENCODING")),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # a tensor layout by its name (torch.strided)
    ("pathlib", "PosixPath"),  # StorageMeta.checkpoint_id: where it was written
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _DCP_GLOBALS or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f".metadata refers to {module}.{name}, which DCP metadata never holds: refused, "
                                     "nothing was run")


class _SafeReader(dcp.FileSystemReader):
    """torch's reader, with the metadata unpickled by `_MetadataUnpickler` instead of `pickle.load`."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        with self.fs.create_stream(self._get_metadata_path(kwargs.get("rank")), "rb") as f:
            metadata = _MetadataUnpickler(f).load()
        if not isinstance(metadata, Metadata):
            raise ValueError(f".metadata holds a {type(metadata).__name__}, not checkpoint metadata")
        for info in (metadata.storage_data or {}).values():
            name = getattr(info, "relative_path", None)  # the shard files, which must lie in dcp/ itself
            if not isinstance(name, str) or os.path.basename(name) != name or name in ("", ".", ".."):
                raise ValueError(f".metadata names a shard file {name!r} outside its directory")
        if getattr(metadata, "storage_meta", None) is None:  # as torch's own read_metadata does
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _SafePlanner(dcp.DefaultLoadPlanner):
    """torch's load planner, with non-tensor values (the optimizer's param-group settings) read by
    `torch.load(weights_only=True)` instead of `weights_only=False`."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


# What reading a damaged or foreign dcp/ raises: a refused or truncated pickle, a missing or short
# file, metadata that does not describe this model's state.
_UNREADABLE = (pickle.UnpicklingError, EOFError, OSError, ValueError, KeyError, TypeError, IndexError, RuntimeError)


def _root_cause(e: BaseException) -> BaseException:
    """The first rank's own error inside a CheckpointException (whose text is every rank's traceback)."""
    if isinstance(e, CheckpointException) and e.failures:
        return next(iter(e.failures.values()))[0]
    return e
