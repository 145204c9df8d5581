"""Typed reads of another format's settings (a `config.json`, GGUF metadata): a missing key or a value
of the wrong type is one line naming the key and the file, not a KeyError or TypeError later on."""

from __future__ import annotations

import math
import re
import reprlib
from pathlib import Path
from typing import Any, Mapping

import torch

from lmforge.config import ModelConfig
from lmforge.utils.errors import UserError

REQUIRED: Any = object()
_WHAT = {int: "a positive integer", float: "a number", bool: "true or false", str: "a string", list: "an array",
         dict: "a JSON object"}


def read_key(meta: Mapping[str, Any], key: str, kind: type, source: str | Path, fix: str,
             default: Any = REQUIRED, prefix: str = "") -> Any:
    """`meta[key]` checked to be of `kind` (int: a positive integer; float: any finite number, returned as
    float); `default` when the key is absent or null, and a UserError naming `prefix + key` and `source`
    when there is no default. `prefix` names the enclosing object (`rope_scaling.`) in messages."""
    value = meta.get(key)
    if value is None:
        if default is REQUIRED:
            raise UserError(f"{source}: {prefix + key!r} is missing; {fix}")
        return default
    if kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= 1
    elif kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    else:
        ok = isinstance(value, kind)
    if not ok and isinstance(value, list) and kind in (int, float):
        raise UserError(
            f"{source}: {prefix + key!r} is a per-layer array {reprlib.repr(value)}; per-layer values are not "
            "supported, only one value for every layer"
        )
    if not ok:
        raise UserError(f"{source}: {prefix + key!r} is {reprlib.repr(value)}, not {_WHAT[kind]}; {fix}")
    return float(value) if kind is float else value


def some_names(names: set[str], n: int = 3) -> str:
    """The first `n` of `names` in natural order (layer 2 before layer 10), for a one-line message."""
    ordered = sorted(names, key=lambda name: [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)])
    return ", ".join(ordered[:n]) + (", ..." if len(ordered) > n else "")


def model_config(source: str | Path, **fields: Any) -> ModelConfig:
    """`ModelConfig(**fields)` read from `source`: sizes that are each valid but disagree
    (n_embd not divisible by n_head, ...) are one line naming `source`."""
    try:
        return ModelConfig(**fields)
    except UserError as e:
        raise UserError(f"{source}: {e}") from None


def check_shape(tensor: torch.Tensor, name: str, shape: tuple[int, ...], says: str) -> torch.Tensor:
    """`tensor` (the file's `name`), after checking it has the `shape` that `says` (its config, its
    metadata) implies. Each q/k/v or gate/up piece is checked before it is fused: only the fused shape
    is checked later, and pieces of the wrong sizes can add up to it and load as garbage."""
    if tuple(tensor.shape) != tuple(shape):
        raise UserError(f"tensor {name} has shape {tuple(tensor.shape)} but {says} implies {tuple(shape)}; "
                        "the config and the weights disagree")
    return tensor
