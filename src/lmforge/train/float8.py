"""FP8 training (`train.fp8`): the blocks' linear layers multiply in float8, through torchao.

torchao's `Float8Linear` keeps each weight in its own dtype and casts at every matmul, with one
dynamic scale per tensor: e4m3 for inputs and weights, e5m2 for the gradients (the FP8 formats
paper, Micikevicius et al. 2022, https://arxiv.org/abs/2209.05433). The optimizer, the checkpoint
and its names are unchanged, so a run trained in fp8 is read back, fine-tuned or served like any
other.

What stays out, as torchtitan leaves out its `output` layer: the output head and the embeddings
(the logits' precision weighs most on the loss; GPT-2 ties the head to the embedding), LoRA
layers (their adapters are a few thousand parameters), and any layer whose weight has a dimension
not divisible by 16, which `torch._scaled_mm` cannot take.

Under FSDP2 (`train.parallel fsdp`) the sharded weights are all-gathered already cast to float8,
a quarter of the bytes of fp32 weights, as torchtitan does: each process casts its shard with
the scale of the whole weight, so the gathered weight is the one a single process would cast.
After each optimizer step, `refresh_float8_scales` works out those scales for every layer with
one all-reduce rather than one per layer in the next forward.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from lmforge.utils.errors import UserError


def to_float8(net: nn.Module, device: torch.device, sharded: bool = False) -> list[str]:
    """Swap the eligible linear layers of `net` (already on `device`) for float8 ones; returns their
    names. `sharded`: the model is about to be sharded by FSDP2, so all-gather its weights in float8."""
    torchao = _quiet_import()
    _check_device(device)
    names = [name for name, module in net.named_modules() if _eligible(name, module)]
    if not names:
        raise UserError("train.fp8: no layer of the blocks can multiply in float8 (it takes plain linear layers "
                        "whose dimensions are divisible by 16; LoRA layers stay out)")
    chosen = set(names)
    config = torchao.Float8LinearConfig(enable_fsdp_float8_all_gather=sharded)
    torchao.convert_to_float8_training(net, config=config, module_filter_fn=lambda _module, fqn: fqn in chosen)
    return names


def refresh_float8_scales(net: nn.Module) -> None:
    """After an optimizer step of a model `to_float8(..., sharded=True)` converted: the float8 scale
    of every sharded weight, in one all-reduce of their maxima (torchao is imported by then)."""
    from torchao.float8 import precompute_float8_dynamic_scale_for_fsdp

    precompute_float8_dynamic_scale_for_fsdp(net)


def _quiet_import():
    """torchao.float8, without the warnings torchao logs when it imports on a machine that cannot load
    its optional CUDA kernels (for MX formats and CUTLASS; the float8 path here uses `torch._scaled_mm`)."""
    loggers = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        import torchao.float8 as float8
    except ImportError:
        raise UserError("train.fp8 needs torchao: pip install torchao") from None
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
    return float8


def _eligible(name: str, module: nn.Module) -> bool:
    return (type(module) is nn.Linear and (".layers." in f".{name}" or ".encoder_layers." in f".{name}")
            and module.in_features % 16 == 0 and module.out_features % 16 == 0)


def _check_device(device: torch.device) -> None:
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < (8, 9):
            raise UserError(f"train.fp8 needs a GPU with FP8 tensor cores (compute capability 8.9 or newer: L4, "
                            f"H100); {torch.cuda.get_device_name(device)} is {major}.{minor}")
        return
    # Other devices: CPU has reference float8 kernels in recent torch (slow; what the tests use).
    one = torch.ones(16, 16, device=device).to(torch.float8_e4m3fn)
    scale = torch.ones((), device=device)
    try:
        torch._scaled_mm(one, one.t(), scale_a=scale, scale_b=scale, out_dtype=torch.float32)
    except (RuntimeError, NotImplementedError):
        raise UserError(f"train.fp8: torch {torch.__version__} has no float8 matmul on {device.type}") from None
