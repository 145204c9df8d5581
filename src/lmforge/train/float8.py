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
"""

from __future__ import annotations

import torch
from torch import nn

from lmforge.utils.errors import UserError


def to_float8(net: nn.Module, device: torch.device) -> list[str]:
    """Swap the eligible linear layers of `net` (already on `device`) for float8 ones; returns their names."""
    try:
        from torchao.float8 import convert_to_float8_training
    except ImportError:
        raise UserError("train.fp8 needs torchao: pip install torchao") from None
    _check_device(device)
    names = [name for name, module in net.named_modules() if _eligible(name, module)]
    if not names:
        raise UserError("train.fp8: no layer of the blocks can multiply in float8 (it takes plain linear layers "
                        "whose dimensions are divisible by 16; LoRA layers stay out)")
    chosen = set(names)
    convert_to_float8_training(net, module_filter_fn=lambda _module, fqn: fqn in chosen)
    return names


def _eligible(name: str, module: nn.Module) -> bool:
    return (type(module) is nn.Linear and ".layers." in f".{name}"
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
