"""The sharded half of a multi-process run's checkpoints: torch.distributed.checkpoint (DCP).

Under several processes (DDP or FSDP2) a step is the one-process files, with the weights gathered to
rank 0, plus `dcp/`, the model and optimizer state written by all ranks in parallel, each its own
shard. A resume on any world size, one process included, loads `dcp/` and lets DCP reshard it; a
one-process checkpoint resumed under several processes is loaded whole and sharded by
`set_model_state_dict`. Gathering the weights costs one full copy on rank 0 per save; the optimizer
state, twice the model's size, stays sharded.

`dcp/` holds pickles (its `.metadata`, and the optimizer's non-tensor values), so it is read with
an unpickler that builds only the classes DCP's metadata is made of and `torch.load(weights_only=True)`:
resuming a checkpoint never runs code from it (DESIGN.md).

`Checkpointer` imports this module only when a run needs it: importing DCP takes about a second,
which no other verb (generate, eval, serve, a one-process pretrain) should pay.
"""

from __future__ import annotations

import io
import os
import pickle
import warnings
from pathlib import Path
from typing import Any

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

from lmforge.checkpoint import Checkpoint, load_model, save_checkpoint
from lmforge.checkpoint.store import SHARDED_DIR, load_optimizer_state, optimizer_fits, resume_fix, with_settings_of
from lmforge.model import Transformer
from lmforge.tokenizer import Tokenizer
from lmforge.train.distributed import World, broadcast_object
from lmforge.utils.errors import UserError, first_line


def restore(ckpt: Checkpoint, net: nn.Module, optimizer: torch.optim.Optimizer, distributed: bool) -> None:
    """Load `ckpt` into `net` and `optimizer`: its `dcp/` on any world size, or its one-process files into
    a model of several processes (`net` wrapped by DDP or sharded by FSDP2)."""
    sharded = ckpt.path / SHARDED_DIR
    if sharded.is_dir():
        state = {"model": get_model_state_dict(net), "optim": get_optimizer_state_dict(net, optimizer)}
        reader = _SafeReader(sharded)
        try:
            reader.read_metadata()  # alone first, for its own error rather than DCP's retry of per-rank files
            with warnings.catch_warnings():  # one process reading a sharded checkpoint is what we mean
                warnings.filterwarnings("ignore", message="torch.distributed is disabled")
                dcp.load(state, storage_reader=reader, planner=_SafePlanner(), no_dist=not distributed)
        except (Exception, CheckpointException) as e:  # CheckpointException (every rank's error) is a BaseException
            cause = _root_cause(e)
            if isinstance(cause, KeyboardInterrupt):  # Ctrl-C while reading: an interrupt, not a damaged file
                raise KeyboardInterrupt from None
            if not isinstance(cause, _UNREADABLE) or isinstance(cause, torch.cuda.OutOfMemoryError):
                raise cause from None  # not the checkpoint's fault (out of memory, a bug): the error itself
            raise UserError(f"{sharded} is unreadable ({first_line(cause)}); {resume_fix(ckpt.path)}") from None
        set_model_state_dict(net, state["model"])
        with optimizer_fits(ckpt):
            set_optimizer_state_dict(net, optimizer, with_settings_of(optimizer, state["optim"]))
        return
    loaded, _ = load_model(ckpt.path, "cpu", fix=resume_fix(ckpt.path))
    optim_state = load_optimizer_state(ckpt)
    full = StateDictOptions(full_state_dict=True)
    set_model_state_dict(net, loaded.state_dict(), options=full)
    with optimizer_fits(ckpt):
        optim_state = _keyed_by_name(net, optimizer, with_settings_of(optimizer, optim_state))
        set_optimizer_state_dict(net, optimizer, optim_state, options=full)


def save(path: Path, net: nn.Module, tokenizer: Tokenizer, trainer_state: dict[str, Any],
         optimizer: torch.optim.Optimizer, metrics_file: Path | None, world: World,
         gathered: Transformer | None) -> Transformer | None:
    """Write step `path` from every rank: rank 0 the one-process files (the weights gathered into
    `gathered`, its full copy, built on the first save and returned for the next) and, with the others,
    `dcp/` inside the same temporary directory, renamed into place once all shards are written."""
    full = get_model_state_dict(net, options=StateDictOptions(full_state_dict=True, cpu_offload=True))  # rank 0 only
    shards = {"model": get_model_state_dict(net), "optim": get_optimizer_state_dict(net, optimizer)}

    told = False  # whether rank 0 has sent the other ranks the directory to write their shards in

    def write_shards(tmp: Path) -> None:
        nonlocal told
        broadcast_object(str(tmp), world)
        told = True
        _write(shards, tmp / SHARDED_DIR)

    if world.main:
        try:
            if gathered is None:
                gathered = Transformer(net.config)
            gathered.load_state_dict(full)
            state = {**trainer_state, "sharded": SHARDED_DIR, "world_size": world.size}
            save_checkpoint(path, gathered, tokenizer, trainer_state=state, metrics_file=metrics_file, extra=write_shards)
        except BaseException:
            if not told:  # the other ranks wait for the directory: tell them there is none, then fail
                broadcast_object(None, world)
            raise
        return gathered
    tmp = broadcast_object(None, world)
    if tmp is None:
        raise UserError(f"rank 0 could not write {path.name} (its error says why); this rank stops too")
    _write(shards, Path(tmp) / SHARDED_DIR)
    return gathered


def _write(shards: dict[str, Any], directory: Path) -> None:
    """`dcp.save`, failing with the first failing rank's own error (a full disk, Ctrl-C), which the CLI
    turns into one line, rather than a CheckpointException holding every rank's traceback."""
    try:
        dcp.save(shards, checkpoint_id=str(directory))
    except CheckpointException as e:
        raise _root_cause(e) from None


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
        for field in ("state_dict_metadata", "storage_data"):  # what DCP indexes without checking
            if not isinstance(getattr(metadata, field, None), dict):
                raise ValueError(f".metadata's {field} is a {type(getattr(metadata, field, None)).__name__}, not a dict")
        for info in metadata.storage_data.values():
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
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:  # torch's text goes on to advise weights_only=False: the unsafe way
            why = next((line.strip() for line in str(e).splitlines() if "WeightsUnpickler error" in line), "")
            raise pickle.UnpicklingError(f"{read_item.dest_index.fqn} holds what a safe load refuses ({why or 'a pickle'}): "
                                         "nothing was run") from None
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
