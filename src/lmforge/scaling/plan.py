"""Plan a training run from a scaling law: the compute-optimal N and D, the loss to expect, the GPU time.

Compute is C = 6 N D (Kaplan et al. 2020, section 2.1; the approximation Hoffmann et al. 2022 use for
their laws, with N every parameter). GPU time is C / (MFU * peak), MFU being the model FLOPs
utilisation of PaLM (Chowdhery et al. 2022, appendix B).
"""

from __future__ import annotations

import math
import os
from numbers import Integral, Real

from lmforge.scaling.laws import ParametricLaw, load_law
from lmforge.utils.errors import UserError

# Dense (no 2:4 sparsity) BF16 tensor-core peaks, FLOP/s, from NVIDIA's datasheets; the datasheets
# print the sparse figure, twice these. H100 and H200 are the SXM parts (same compute; H200 has more
# and faster memory); the H100 PCIe card is clocked lower.
GPU_PEAK_FLOPS = {
    "h100": 989.5e12,
    "h100-pcie": 756.5e12,
    "h200": 989.5e12,
    "a100": 312e12,
    "a10": 125e12,
    "l4": 121e12,
}

# A plan whose optimum has fewer parameters is a mistake (wrong units, most likely): even a 1-layer
# Transformer 64 wide has ~50k parameters, 12 * 64^2 in its block alone.
MIN_PARAMS = 1000


def _positive(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) or value <= 0:
        raise UserError(f"--{name} must be a finite number > 0, got {value!r}")
    return float(value)


def plan(
    flops: float | None = None,
    params: float | None = None,
    tokens: float | None = None,
    law: str | os.PathLike | ParametricLaw = "chinchilla",
    gpu: str = "h100",
    mfu: float = 0.45,
    gpus: int = 1,
) -> dict[str, float | str | int]:
    """The compute-optimal run for one given quantity: exactly one of `flops`, `params`, `tokens`.

    Given C: N and D from the law's closed-form optimum. Given N: the D for which N is compute-optimal
    (the closed form inverted), and C = 6 N D. Given D: likewise N.

    Args:
        law: `chinchilla` (Hoffmann et al. 2022), `besiroglu` (Besiroglu et al. 2024), the path of a
            fit.json written by `lmforge scaling fit`, or a `ParametricLaw`.
        gpu: one of GPU_PEAK_FLOPS.
        mfu: the fraction of peak the training run achieves.
        gpus: GPUs working in parallel; wall time is GPU-hours over this (perfect scaling at that MFU).

    Returns params, tokens, flops, loss, tokens_per_param, gpu_hours, wall_hours, and the law, gpu,
    peak_flops, mfu and gpus they assume.
    """
    given = {k: v for k, v in (("flops", flops), ("params", params), ("tokens", tokens)) if v is not None}
    if len(given) != 1:
        raise UserError(f"give exactly one of --flops, --params or --tokens (got {sorted(given) or 'none'})")
    (what, value), = given.items()
    value = _positive(what, value)
    law = load_law(law)
    if gpu.lower() not in GPU_PEAK_FLOPS:
        raise UserError(f"unknown GPU {gpu!r}; choose one of {sorted(GPU_PEAK_FLOPS)}")
    peak = GPU_PEAK_FLOPS[gpu.lower()]
    if not 0 < mfu <= 1:
        raise UserError(f"--mfu must be in (0, 1], got {mfu}; 0.3-0.5 is typical of large dense training runs")
    if isinstance(gpus, bool) or not isinstance(gpus, Integral) or gpus < 1:
        raise UserError(f"--gpus must be a whole number >= 1, got {gpus!r}")
    if not math.isfinite(law.G):
        raise UserError(
            f"scaling law {law.name!r} has no usable optimum: G = (alpha A / (beta B))^(1 / (alpha + beta)) is "
            f"beyond floating-point range (10^{law.log_G / math.log(10):.0f}); check its constants"
        )

    if what == "flops":
        N, D = law.optimum(value)
    elif what == "params":
        N, D = value, law.tokens_for(value)
    else:
        N, D = law.params_for(value), value
    if N < MIN_PARAMS:
        smallest = {
            "flops": 6 * MIN_PARAMS * law.tokens_for(MIN_PARAMS), "params": MIN_PARAMS,
            "tokens": law.tokens_for(MIN_PARAMS),
        }[what]
        why = f"--{what} {value:.3g} is too small for any model: the compute-optimal model under {law.name} would " \
              f"have {N:.3g} parameters (< {MIN_PARAMS})"
        if not math.isfinite(smallest):  # a steep law from a fit (beta / (alpha + beta) near 0)
            raise UserError(f"{why}, and no budget within floating-point range gives {law.name} a model of "
                            f"{MIN_PARAMS} parameters; check its constants")
        step = 10 ** (math.floor(math.log10(smallest)) - 2)
        enough = math.ceil(smallest / step) * step  # rounded up to 3 digits, so the number shown suffices
        raise UserError(f"{why}; use --{what} of at least {enough:.3g}")
    C = 6.0 * N * D
    gpu_hours = C / (mfu * peak) / 3600.0
    loss = float(law.loss(N, D))
    if not all(math.isfinite(v) and v > 0 for v in (N, D, C, gpu_hours)) or not math.isfinite(loss):
        raise UserError(
            f"--{what} {value:.3g} under {law.name} gives a run beyond floating-point range "
            f"(N = {N:.3g}, D = {D:.3g}, C = {C:.3g}); use a smaller --{what}"
        )
    return {
        "params": N, "tokens": D, "flops": C, "loss": loss, "tokens_per_param": D / N,
        "gpu_hours": gpu_hours, "wall_hours": gpu_hours / gpus,
        "law": law.name, "gpu": gpu.lower(), "peak_flops": peak, "mfu": mfu, "gpus": gpus,
    }
