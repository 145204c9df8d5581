"""LoRA by swapping `nn.Linear` modules (Hu et al. 2021, https://arxiv.org/abs/2106.09685).

A `LoRALinear` is an `nn.Linear` with the same `weight` and `bias` (so checkpoint keys do not
change) plus low-rank adapters on slices of its output. Slices are how PEFT's per-projection
names map onto lmforge's fused layers: `q`, `k`, `v` are row ranges of `attention.qkv`, and
`gate`, `up` the halves of a SwiGLU `feed_forward.fc`.

    y = W x + b + scale * concat_over_slices(B_i A_i dropout_i(x))   (zero outside the slices)

A starts Kaiming-uniform and B at zero (the paper's init: the model is unchanged at step 0);
`merge_lora` folds W[slice_i] += scale * B_i A_i and puts plain `nn.Linear`s back.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.config.model import LoraConfig, ModelConfig

Slice = tuple[int, int]


class LoRALinear(nn.Linear):
    def __init__(self, base: nn.Linear, slices: list[Slice], cfg: LoraConfig) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias  # the same Parameters: keys and sharing unchanged
        self.slices, self.scale = slices, cfg.scale
        self.lora_A = nn.ParameterList(nn.Parameter(torch.empty(cfg.r, self.in_features)) for _ in slices)
        self.lora_B = nn.ParameterList(nn.Parameter(torch.zeros(e - s, cfg.r)) for s, e in slices)
        for a in self.lora_A:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.lora_dropout = nn.Dropout(cfg.dropout)
        self.to(device=base.weight.device, dtype=base.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        pieces, at = [], 0
        for (s, e), a, b in zip(self.slices, self.lora_A, self.lora_B):
            if s > at:
                pieces.append(y.new_zeros(*y.shape[:-1], s - at))
            # A mask per slice: in PEFT q_proj and v_proj are separate layers with a dropout each.
            pieces.append(F.linear(F.linear(self.lora_dropout(x), a), b) * self.scale)
            at = e
        if at < self.out_features:
            pieces.append(y.new_zeros(*y.shape[:-1], self.out_features - at))
        return y + torch.cat(pieces, dim=-1)

    def merged(self) -> nn.Linear:
        """A plain `nn.Linear` whose weight includes the adapters' update."""
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        out.weight, out.bias = self.weight, self.bias
        with torch.no_grad():
            for (s, e), a, b in zip(self.slices, self.lora_A, self.lora_B):
                self.weight[s:e] += (b.float() @ a.float() * self.scale).to(self.weight.dtype)
        return out


def _targets(config: ModelConfig, module_name: str, layer: nn.Linear) -> list[Slice]:
    """The output slices of `layer` (named `module_name` inside a Block) that the targets adapt."""
    want = set(config.lora.target_list)
    c = config.n_embd
    kv = config.kv_heads * config.head_size
    spans: dict[str, Slice] = {}
    if module_name == "attention.qkv":
        spans = {"q": (0, c), "k": (c, c + kv), "v": (c + kv, c + 2 * kv)}
    elif module_name == "cross_attention.q":
        spans = {"q": (0, c)}
    elif module_name == "cross_attention.kv":
        spans = {"k": (0, c), "v": (c, 2 * c)}
    elif module_name.endswith("attention.proj"):
        spans = {"o": (0, c)}
    elif module_name == "feed_forward.fc":
        h = config.hidden_size
        spans = {"gate": (0, h), "up": (h, 2 * h)} if config.mlp == "swiglu" else {"up": (0, h)}
    elif module_name == "feed_forward.proj":
        spans = {"down": (0, c)}
    return sorted(span for name, span in spans.items() if name in want)


def add_lora(model: nn.Module, config: ModelConfig) -> int:
    """Swap the targeted linear layers of every block for `LoRALinear`s; the number swapped."""
    swapped = 0
    for stack in ("layers", "encoder_layers"):
        for block in getattr(model, stack, ()):
            for name, module in list(block.named_modules()):
                if type(module) is not nn.Linear or not (slices := _targets(config, name, module)):
                    continue
                parent_name, _, attr = name.rpartition(".")
                setattr(block.get_submodule(parent_name), attr, LoRALinear(module, slices, config.lora))
                swapped += 1
    return swapped


def merge_lora(model: nn.Module) -> int:
    """Fold every `LoRALinear` into a plain `nn.Linear` in place; the number merged."""
    merged = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name), attr, module.merged())
            merged += 1
    return merged


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for m in model.modules() if isinstance(m, LoRALinear) for p in (*m.lora_A, *m.lora_B)]
