"""The scaling study's PNG plots, written next to results.jsonl (matplotlib Agg; a temporary name, then rename)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from lmforge.scaling.laws import ParametricLaw
from lmforge.scaling.runs import Run, frontier, isoflop_profiles


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: Path) -> Path:
    tmp = path.with_name(f".{path.name}.tmp.png")
    try:
        fig.tight_layout()
        fig.savefig(tmp)
        tmp.replace(path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return path


def _size_colors(plt, runs: Sequence[Run]):
    from matplotlib.colors import LogNorm

    sizes = [r.params for r in runs]
    norm = LogNorm(min(sizes), max(sizes) * (1 + 1e-9))  # a one-size study still gets a valid norm
    return plt.get_cmap("viridis"), norm


def plot_loss_vs_compute(runs: Sequence[Run], kaplan: dict[str, Any] | None, path: Path) -> Path:
    """Every run (and its curve) against compute, the compute-efficient frontier, and Kaplan's L(C)."""
    plt = _pyplot()
    cmap, norm = _size_colors(plt, runs)
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for r in runs:
        pts = np.array(r.points())
        if len(pts) > 1:
            ax.plot(pts[:, 1], pts[:, 2], color=cmap(norm(r.params)), alpha=0.4, linewidth=0.8)
    dots = ax.scatter([r.flops for r in runs], [r.loss for r in runs], c=[r.params for r in runs],
                      cmap=cmap, norm=norm, s=18, zorder=3, edgecolors="k", linewidths=0.3)
    C, L = frontier(runs)
    ax.step(C, L, where="post", color="k", linewidth=1.4, label="compute-efficient frontier")
    if kaplan is not None:  # with the frontier it was fitted to, in Kaplan's C (non-embedding N)
        k, c_c = kaplan["L(C)"]["exponent"], kaplan["L(C)"]["scale"]
        C_k, L_k = frontier(runs, non_embedding=True)
        ax.step(C_k, L_k, where="post", color="r", linewidth=0.8, alpha=0.5, label="frontier in Kaplan's C")
        xs = np.geomspace(C_k.min(), C_k.max(), 100)
        ax.plot(xs, (c_c / xs) ** k, "r--", linewidth=1.2, label=f"Kaplan L(C) = (C_c / C)^{k:.3f}, C = 6 N_non-emb D")
    fig.colorbar(dots, ax=ax, label="parameters N")
    _log_axes(ax, "training compute C (FLOPs)", "validation loss (nats/token)", "loss vs compute", log_y=True)
    return _save(plt, fig, path)


def _log_axes(ax, xlabel: str, ylabel: str, title: str, log_y: bool = False, legend_size: float | None = None) -> None:
    """Log-scaled x (and optionally y), labels, a light grid and the legend."""
    ax.set_xscale("log")
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=legend_size)


def plot_isoflop(runs: Sequence[Run], approach2: dict[str, Any], path: Path) -> Path:
    """Approach 2 as Hoffmann et al. 2022, figure 3: the isoFLOP parabolas, then N_opt and D_opt against C."""
    plt = _pyplot()
    profiles = dict(isoflop_profiles(runs))
    budgets = approach2["budgets"]
    cmap = plt.get_cmap("plasma")
    fig, (ax, ax_opt) = plt.subplots(1, 2, figsize=(11, 4.5), dpi=120)
    for i, b in enumerate(budgets):
        color = cmap(0.85 * i / max(1, len(budgets) - 1))
        members = profiles[b["flops"]]
        n = np.array([r.params for r in members], dtype=float)
        lo, hi = np.log(min(n.min(), b["params_opt"])), np.log(max(n.max(), b["params_opt"]))
        xs = np.linspace(lo, hi, 100)
        ax.scatter(n, [r.loss for r in members], color=color, s=18, zorder=3)
        ax.plot(np.exp(xs), np.polyval(b["parabola"], xs), color=color, linewidth=1.2, label=f"C = {b['flops']:.2g}")
        ax.plot(b["params_opt"], b["loss_opt"], marker="*", color=color, markersize=11, markeredgecolor="k", zorder=4)
    _log_axes(ax, "parameters N", "validation loss (nats/token)", "isoFLOP profiles (approach 2)", legend_size=8)
    C = np.array([b["flops"] for b in budgets])
    xs = np.geomspace(C.min(), C.max(), 50)
    for key, coef, exp, label, color in (
        ("params_opt", "params_coef", "a", "N_opt", "tab:blue"),
        ("tokens_opt", "tokens_coef", "b", "D_opt", "tab:orange"),
    ):
        k, p = approach2[coef], approach2[exp]
        ax_opt.scatter(C, [b[key] for b in budgets], color=color, zorder=3)
        ax_opt.plot(xs, k * xs**p, color=color, label=f"{label} ∝ C^{p:.3f}")
    _log_axes(ax_opt, "training compute C (FLOPs)", "compute-optimal N and D", "optimum per budget", log_y=True)
    return _save(plt, fig, path)


def plot_fitted_vs_observed(runs: Sequence[Run], approach3: dict[str, Any], path: Path) -> Path:
    """Approach 3's predicted loss of every run against the loss it reached; a perfect fit lies on the diagonal."""
    plt = _pyplot()
    law = ParametricLaw(**approach3["law"])
    cmap, norm = _size_colors(plt, runs)
    observed = np.array([r.loss for r in runs])
    predicted = law.loss(np.array([r.params for r in runs], float), np.array([r.tokens for r in runs], float))
    fig, ax = plt.subplots(figsize=(6, 5), dpi=120)
    lim = [min(observed.min(), predicted.min()), max(observed.max(), predicted.max())]
    ax.plot(lim, lim, color="0.5", linewidth=1, label="predicted = observed")
    dots = ax.scatter(observed, predicted, c=[r.params for r in runs], cmap=cmap, norm=norm, s=20, zorder=3,
                      edgecolors="k", linewidths=0.3)
    fig.colorbar(dots, ax=ax, label="parameters N")
    ax.set_xlabel("observed loss (nats/token)")
    ax.set_ylabel("predicted loss (nats/token)")
    ax.set_title(f"L = {law.E:.3g} + {law.A:.4g} / N^{law.alpha:.3f} + {law.B:.4g} / D^{law.beta:.3f}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(plt, fig, path)


def write_plots(directory: Path, runs: Sequence[Run], result: dict[str, Any]) -> list[Path]:
    """The plots `result` (a fit) supports; a plot whose approach was skipped is removed, not left stale."""

    def fitted(name: str) -> dict[str, Any] | None:
        section = result.get(name)
        return section if section is not None and "skipped" not in section else None

    written = [plot_loss_vs_compute(runs, fitted("kaplan"), directory / "loss_vs_compute.png")]
    for name, filename, plot in (
        ("approach2", "isoflop.png", plot_isoflop), ("approach3", "fitted_vs_observed.png", plot_fitted_vs_observed),
    ):
        section = fitted(name)
        if section is not None:
            written.append(plot(runs, section, directory / filename))
        else:
            (directory / filename).unlink(missing_ok=True)
    return written
