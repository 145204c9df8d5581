"""Device and precision defaults: CUDA + bf16 autocast where available, CPU + fp32 otherwise."""

from __future__ import annotations

import contextlib
import os
from typing import TypeVar

import torch

from lmforge.utils.errors import UserError

T = TypeVar("T")


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        device = None
    # torch also names devices lmforge does not run on (meta holds no data, mps, xla, ...) and takes any
    # CPU index: refused here, not later as a checkpoint that "is corrupt" on them.
    if device is None or device.type not in ("cpu", "cuda") or (device.type == "cpu" and device.index not in (None, 0)):
        raise UserError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N")
    if device.type == "cpu":
        return torch.device("cpu")  # cpu:0 too: safetensors reads onto "cpu", not "cpu:0"
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name!r} asked for but CUDA is not available; "
                        "use the cpu device (--device cpu, or --train.device cpu to train)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise UserError(f"device {name!r} asked for but this machine has {count} CUDA device{'s' if count > 1 else ''} "
                        f"(cuda:0 to cuda:{count - 1}); use one of them")
    return device


def autocast_dtype(device: torch.device, dtype: str = "auto") -> torch.dtype | None:
    """The autocast dtype for `dtype` on `device`, or None for plain fp32."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if dtype == "float32":
        return None
    if dtype == "bfloat16":
        return torch.bfloat16
    raise UserError(f"unknown dtype {dtype!r}; use auto, float32 or bfloat16")


def inference_dtype(device: torch.device, dtype: str = "auto") -> torch.dtype:
    """The weights' dtype for inference under `dtype`: `auto` is bf16 on a CUDA GPU that has it
    (as vLLM and transformers serve) and fp32 on CPU; `bfloat16` on CPU halves the weights' memory
    and runs the matmuls in bf16, which is faster on CPUs with AVX512-BF16 or AMX."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return autocast_dtype(device, dtype) or torch.float32


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def compile_module(fn: T, mode: str = "default") -> T:
    """`torch.compile` of a module or function under `TrainConfig.compile_mode`'s names ("default":
    torch's own default mode)."""
    return torch.compile(fn, mode=None if mode == "default" else mode)


def replays_cuda_graphs(mode: str, device: torch.device) -> bool:
    """Whether a module compiled in `mode` on `device` replays CUDA graphs. Each replay reuses the
    previous one's output memory, so every step must begin with `torch.compiler.cudagraph_mark_step_begin()`."""
    return device.type == "cuda" and mode in ("reduce-overhead", "max-autotune")


def free_memory(device: torch.device) -> int | None:
    """Bytes that an allocation on `device` can still take (CUDA: free device memory; CPU: Linux's
    MemAvailable, elsewhere the free pages POSIX reports), or None where it cannot be told."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:  # no /proc/meminfo: not Linux (macOS has no SC_AVPHYS_PAGES either, hence None)
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None
