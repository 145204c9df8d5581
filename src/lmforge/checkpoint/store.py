"""Write and read checkpoint directories: atomically, and without ever executing file contents."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model as st_load_model, save_file, save_model as st_save_model

from lmforge.config import ModelConfig
from lmforge.model import Transformer
from lmforge.tokenizer import Tokenizer
from lmforge.utils.errors import UserError, first_line
from lmforge.utils.fs import atomic_dir, atomic_write_json, check_replaceable, read_json, usual_mode

FORMAT = 1
STEP_DIR = re.compile(r"^step-(\d{6,})$")
CKPT_FIX = "use another checkpoint (a complete step-* directory) or retrain"
# What every checkpoint holds: `save_checkpoint` writes them into a temporary directory renamed into
# place, so a step-* directory lacking one is a copy still in progress (rsync and cp write config.json
# first) or a damaged one, never the latest checkpoint of its run.
CKPT_FILES = ("config.json", "model.safetensors", "tokenizer.json")
SHARDED_DIR = "dcp"  # a multi-process run's step: model and optimizer state, written by torch.distributed.checkpoint


def resume_fix(path: Path) -> str:
    """What to do about a damaged latest step: --resume takes the latest complete step and no other."""
    return (f"use another checkpoint: move {path} out of the run directory to resume from another step "
            "(--resume takes the latest one left), or retrain")


@dataclass
class Checkpoint:
    """What a checkpoint directory holds, loaded; `fix` ends the error of a damaged file read later."""

    path: Path
    model_config: ModelConfig
    tokenizer: Tokenizer
    fix: str = field(default=CKPT_FIX, repr=False)

    @cached_property
    def trainer_state(self) -> dict[str, Any] | None:
        """trainer_state.json (None for a bare model), read when first asked for: inference never needs
        it, so a damaged one stops only what does (a resume, a task's pipeline, merge-lora)."""
        state_file = self.path / "trainer_state.json"
        return read_json(state_file, self.fix) if state_file.exists() else None


def save_checkpoint(
    path: str | Path,
    model: Transformer,
    tokenizer: Tokenizer,
    *,
    trainer_state: dict[str, Any] | None = None,
    optimizer_state: dict[str, Any] | None = None,
    metrics_file: str | Path | None = None,
    extra: Callable[[Path], None] | None = None,
) -> Path:
    """Write a checkpoint directory at `path` in one rename (a crash leaves the old one or none).

    `extra`, when given, is called with the temporary directory before the rename, to add files
    that belong to the same atomic checkpoint (the trainer's sharded `dcp/` directory).
    """
    path = Path(path)
    check_checkpoint_out(path, training=trainer_state is not None and "step" in trainer_state)
    with atomic_dir(path) as tmp:
        atomic_write_json(tmp / "config.json", {"format": FORMAT, "model": model.config.to_dict()})
        st_save_model(model, str(tmp / "model.safetensors"))
        usual_mode(tmp / "model.safetensors")  # safetensors 0.8 writes 0600
        tokenizer.save(tmp)
        if trainer_state is not None:
            state = dict(trainer_state)
            if optimizer_state is not None:
                tensors: dict[str, torch.Tensor] = {}
                state["optimizer"] = _split_tensors(optimizer_state, "optimizer", tensors)
                save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "optimizer.safetensors"))
                usual_mode(tmp / "optimizer.safetensors")
            atomic_write_json(tmp / "trainer_state.json", state)
        if metrics_file is not None and Path(metrics_file).exists():
            shutil.copyfile(metrics_file, tmp / "metrics.jsonl")
        if extra is not None:
            extra(tmp)
    return path


def check_checkpoint_out(out: str | Path, *sources: str | Path, training: bool = False) -> None:
    """Refuse an `out` that a new checkpoint must not replace: anything but an absent or empty directory or
    an earlier checkpoint, and never one of `sources` (what is being converted), a directory inside or
    around one, or (unless `training`: a run re-saving its own step) a training checkpoint or run directory.
    Callers that convert call it before the work; `save_checkpoint` calls it again."""
    check_replaceable(out, "config.json", "a checkpoint directory", key="model", sources=sources, training=training)


def check_run_out(out: str | Path) -> None:
    """Refuse a run directory `out` (a training run's, or a scaling study's) that is empty or is, or lies
    in, a checkpoint (or model) directory or a prepared data directory: a run writes step-* directories
    and a metrics.jsonl of its own there, which would replace the checkpoint's metrics and vanish when
    the data is prepared again. Called by `pretrain`, `finetune` and `scaling sweep` before any work."""
    if not str(out).strip():
        raise UserError("--out is empty; pass the run directory to write, e.g. --out runs/x")
    path = Path(os.path.abspath(out))
    for where in (path, *path.parents):
        if (where / "config.json").is_file() and any((where / f).exists() for f in ("model.safetensors", "trainer_state.json")):
            what = "the checkpoint"
        elif (where / "meta.json").is_file() and (where / "tokenizer.json").is_file():
            what = "the data directory"
        else:
            continue
        relation = "is" if where == path else "is inside"
        why = "which `lmforge prepare` replaces as a whole" if what == "the data directory" else "whose files a run's would mix with"
        raise UserError(f"--out {out} {relation} {what} {where}, {why} (a run writes step-* checkpoints and a "
                        "metrics.jsonl); pass an --out outside it")


def _steps(run_dir: Path) -> list[Path]:
    """The step-* entries of a run directory, oldest first."""
    if not run_dir.is_dir():
        return []
    steps = [(int(m.group(1)), p) for p in run_dir.iterdir() if (m := STEP_DIR.match(p.name))]
    return [p for _, p in sorted(steps)]


def lacks(step: Path) -> list[str]:
    """The files of `CKPT_FILES` that a step-* entry lacks (all of them for a file)."""
    return [f for f in CKPT_FILES if not (step / f).is_file()]


def find_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete step checkpoints under a run directory, oldest first."""
    return [p for p in _steps(Path(run_dir)) if not lacks(p)]


def incomplete_steps(run_dir: str | Path) -> list[Path]:
    """The step-* entries of a run directory that are not complete checkpoints, oldest first."""
    return [p for p in _steps(Path(run_dir)) if lacks(p)]


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory itself, or the latest complete step checkpoint of a run directory."""
    path = Path(path)
    if (path / "config.json").is_file():
        return path
    found = find_checkpoints(path)
    if found:
        return found[-1]
    if not path.exists():
        raise UserError(f"checkpoint {path} does not exist; pass a directory written by `lmforge pretrain`")
    partial = incomplete_steps(path)
    if partial:
        raise UserError(f"{path} holds no complete checkpoint: {partial[-1].name} lacks {', '.join(lacks(partial[-1]))}; "
                        "let a copy in progress finish, or pass another checkpoint or run directory")
    raise UserError(f"{path} holds no checkpoint (no config.json and no step-* directories); pass a checkpoint or run directory")


def is_hf_config(config: Any) -> bool:
    """Whether a config.json's content is a Hugging Face model's (it names a model_type or architectures),
    which a checkpoint's never does."""
    return isinstance(config, dict) and ("model_type" in config or "architectures" in config)


def check_tokenizer_fits(tokenizer: Tokenizer, tokenizer_file: Path, config: ModelConfig, config_file: Path, fix: str) -> None:
    """Refuse a tokenizer with more tokens than the model has embeddings: its extra ids would index
    past the embedding table (an IndexError deep in the model, or garbage from an exported one)."""
    if config.vocab_size is not None and tokenizer.vocab_size > config.vocab_size:
        raise UserError(f"{tokenizer_file} has {tokenizer.vocab_size} tokens but the model's vocab_size is "
                        f"{config.vocab_size} ({config_file}); {fix}")


def load_checkpoint(path: str | Path, fix: str = CKPT_FIX) -> Checkpoint:
    """Read a checkpoint's config and tokenizer (weights are loaded by `load_model`, trainer state when
    first asked for); `fix` ends the error of a damaged config.json or trainer_state.json."""
    path = resolve_checkpoint(path)
    config = read_json(path / "config.json", fix)
    if is_hf_config(config):
        raise UserError(f"{path} is a Hugging Face model directory, not an lmforge checkpoint; convert it first with "
                        f"`lmforge import hf {path} --out CKPT` and use CKPT")
    if not isinstance(config, dict) or config.get("format") != FORMAT or "model" not in config:
        raise UserError(f"{path / 'config.json'} is not an lmforge checkpoint config (format {FORMAT}); re-export it")
    model_config = ModelConfig.from_dict(config["model"], origin=str(path / "config.json"))
    if model_config.vocab_size is None:  # every checkpoint's has one: the size its embeddings were made for
        raise UserError(f"{path / 'config.json'} sets no model.vocab_size; add the vocab_size the model was trained "
                        f"with (its data directory's meta.json has it), or {fix}")
    if not (path / "tokenizer.json").is_file():
        raise UserError(f"{path / 'tokenizer.json'} is missing; the checkpoint is incomplete: copy in the tokenizer.json "
                        "it was trained with (its data directory has one), or use another checkpoint")
    restore = ("restore tokenizer.json from another step of its run (or the run's data directory), or re-import or "
               "re-export the checkpoint")
    tokenizer = Tokenizer.load(path, fix=f"the checkpoint {path} needs the tokenizer its weights were trained with: "
                                         f"{restore}; a newly trained tokenizer would not match")
    check_tokenizer_fits(tokenizer, path / "tokenizer.json", model_config, path / "config.json",
                         f"it is not the tokenizer the weights were trained with: {restore}")
    return Checkpoint(path, model_config, tokenizer, fix)


def load_model(path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
               fix: str = CKPT_FIX) -> tuple[Transformer, Checkpoint]:
    """The model of a checkpoint in eval mode on `device` (its floating-point tensors cast to `dtype`
    if given), and the checkpoint's other contents; `fix` ends the error of a damaged file."""
    ckpt = load_checkpoint(path, fix)
    model = Transformer.unfilled(ckpt.model_config)  # every weight is read below, or the load is refused
    weights = ckpt.path / "model.safetensors"
    if not weights.exists():
        raise UserError(f"{weights} is missing; the checkpoint is incomplete, use another step or retrain")
    try:
        missing, unexpected = st_load_model(model, str(weights), strict=False, device=str(device))
    except RuntimeError as e:
        mismatch = [line.strip() for line in str(e).splitlines() if line.strip().startswith("size mismatch")]
        if not mismatch:
            raise UserError(f"{weights} is corrupt ({first_line(e)}); {fix}") from None
        more = f", and {len(mismatch) - 1} more" if len(mismatch) > 1 else ""
        raise UserError(
            f"{weights} does not match config.json ({mismatch[0].rstrip('.')}{more}); "
            "the checkpoint is inconsistent: restore its config.json or re-save it"
        ) from None
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{weights} is corrupt ({first_line(e)}); {fix}") from None
    if missing or unexpected:
        raise UserError(
            f"{weights} does not match config.json (missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}); "
            "the checkpoint is inconsistent, re-save it"
        )
    return model.to(device=device, dtype=dtype).eval(), ckpt


def load_optimizer_state(ckpt: Checkpoint) -> dict[str, Any]:
    """The optimizer state_dict saved with a training checkpoint, read to resume it (so a damaged one
    is to be moved aside: --resume takes no other step)."""
    if ckpt.trainer_state is None or "optimizer" not in ckpt.trainer_state:
        raise UserError(f"{ckpt.path} holds no optimizer state; it cannot be resumed, start a new run from it")
    fix = resume_fix(ckpt.path)
    try:
        tensors = load_file(str(ckpt.path / "optimizer.safetensors"))
    except (SafetensorError, OSError) as e:
        raise UserError(f"{ckpt.path / 'optimizer.safetensors'} is unreadable ({first_line(e)}); {fix}") from None
    try:
        state = _join_tensors(ckpt.trainer_state["optimizer"], tensors)
    except KeyError as e:
        raise UserError(f"{ckpt.path / 'optimizer.safetensors'} lacks the tensor {e.args[0]!r} that trainer_state.json "
                        f"names; {fix}") from None
    except (TypeError, ValueError) as e:  # a "__dict__" entry that is not a list of [key, value] pairs
        raise UserError(f"{ckpt.path / 'trainer_state.json'} has a damaged optimizer entry ({first_line(e)}); {fix}") from None
    # What torch's load_state_dict indexes without checking: the rest it checks itself.
    for key, kind in (("state", dict), ("param_groups", list)):
        if not isinstance(state, dict) or not isinstance(state.get(key), kind):
            raise UserError(f"{ckpt.path / 'trainer_state.json'} has a damaged optimizer entry (no {key}); {fix}")
    return state


def with_settings_of(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> dict[str, Any]:
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


@contextlib.contextmanager
def optimizer_fits(ckpt: Checkpoint) -> Iterator[None]:
    """Turn torch's refusal of a saved optimizer state (another group layout, a damaged entry) into one line."""
    try:
        yield
    except (ValueError, KeyError, TypeError, IndexError) as e:
        raise UserError(f"the optimizer state in {ckpt.path} does not fit this run's optimizer ({first_line(e)}); "
                        f"resume with the --train settings the run was trained with, or {resume_fix(ckpt.path)}") from None


def _split_tensors(obj: Any, prefix: str, out: dict[str, torch.Tensor]) -> Any:
    """Replace every tensor in a nested dict/list by {"__tensor__": key}, collecting it into `out`."""
    if isinstance(obj, torch.Tensor):
        out[prefix] = obj.detach().cpu()
        return {"__tensor__": prefix}
    if isinstance(obj, dict):
        return {"__dict__": [[k, _split_tensors(v, f"{prefix}.{k}", out)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return [_split_tensors(v, f"{prefix}.{i}", out) for i, v in enumerate(obj)]
    return obj


def _join_tensors(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict) and "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if isinstance(obj, dict) and "__dict__" in obj:
        # Keys keep their type (optimizer state is keyed by int parameter index).
        return {k: _join_tensors(v, tensors) for k, v in obj["__dict__"]}
    if isinstance(obj, list):
        return [_join_tensors(v, tensors) for v in obj]
    return obj

