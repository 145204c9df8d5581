"""Scaling laws fitted to a table of training runs: Kaplan's power laws and Chinchilla's three approaches.

    DIR/results.jsonl ──> read_runs ──> kaplan      L(N), L(D), L(C) as pure power laws
                                        approach1   minimum-loss envelope of training curves
                                        approach2   a parabola per isoFLOP profile
                                        approach3   parametric L(N, D), Huber loss, L-BFGS
                      ──> bootstrap (intervals of every exponent) ──> DIR/fit.json + PNG plots

Kaplan et al. 2020, "Scaling Laws for Neural Language Models" (arXiv:2001.08361); Hoffmann et al. 2022,
"Training Compute-Optimal Large Language Models" (arXiv:2203.15556), section 3. Kaplan's fits use the
non-embedding parameter count, Chinchilla's approaches the full one, as each paper did.
"""

from __future__ import annotations

import itertools
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from lmforge.scaling.laws import ParametricLaw
from lmforge.scaling.runs import RESULTS, Run, frontier, isoflop_profiles, lower_envelope, read_runs
from lmforge.utils.errors import UserError
from lmforge.utils.fs import atomic_write_json

APPROACHES = ("kaplan", "approach1", "approach2", "approach3")


def _loglog_line(x, y) -> tuple[float, float]:
    """Slope and intercept of log y against log x, by least squares."""
    slope, intercept = np.polyfit(np.log(x), np.log(y), 1)
    return float(slope), float(intercept)


def fit_power_law(x, y, what: str = "x") -> dict[str, float]:
    """Kaplan et al.'s pure power law y = (x_c / x)^k, fitted as a straight line in log-log space.

    log y = k log x_c - k log x, so the slope is -k and the intercept k log x_c. There is no
    irreducible term, as in Kaplan's eqs. 1.1-1.3; that is why such exponents drift once losses near
    the entropy of the text (Hoffmann et al. 2022, section 5), and what approach 3's E accounts for.
    """
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    distinct = np.unique(x).size
    if distinct < 2:
        raise UserError(f"a power law in {what} needs losses at >= 2 distinct values of {what}; got {distinct}")
    slope, intercept = _loglog_line(x, y)
    k = -slope
    if k <= 0:
        raise UserError(
            f"loss does not fall with {what} across these runs (fitted exponent {k:.3g}); "
            f"a power law needs runs where more {what} gives lower loss"
        )
    if intercept / k > 700:  # exp would overflow: the loss is all but flat in x
        raise UserError(
            f"loss hardly changes with {what} across these runs (fitted exponent {k:.3g}); "
            f"a power law needs runs that span more {what}"
        )
    return {"exponent": k, "scale": math.exp(intercept / k), "points": int(x.size)}


def kaplan(runs: Sequence[Run]) -> dict[str, Any]:
    """Kaplan et al. 2020, eqs. 1.1-1.3: L(N) = (N_c/N)^alpha_N, L(D) = (D_c/D)^alpha_D, L(C) = (C_c/C)^alpha_C.

    Kaplan fits L(N) to models trained to convergence, L(D) to the largest model stopped early and
    L(C) to the compute-efficient frontier. From a finite table the closest stand-ins are: the lowest
    loss each model size (non-embedding N) reached; the lowest loss any run reached by D tokens; the
    lowest loss any run reached by C FLOPs. Curves count where present. C is Kaplan's own 6 N D with
    non-embedding N (section 2.1), not the run's `flops` (every parameter, or measured), in FLOPs rather
    than Kaplan's PF-days (C_c is in FLOPs too).
    """
    best_by_size: dict[float, float] = {}
    for r in runs:
        best = min(loss for _, _, loss in r.points())
        best_by_size[r.params_no_embed] = min(best_by_size.get(r.params_no_embed, math.inf), best)
    pts = np.array([p for r in runs for p in r.points()])  # (tokens, compute, loss)
    series = {
        "L(N)": (np.array(list(best_by_size)), np.array(list(best_by_size.values())), "N", "model sizes"),
        "L(D)": (*lower_envelope(pts[:, 0], pts[:, 2]), "D", "points on the data frontier"),
        "L(C)": (*frontier(runs, non_embedding=True), "C", "points on the compute frontier"),
    }
    out: dict[str, Any] = {}
    for label, (x, y, what, desc) in series.items():
        if x.size < 3:
            raise UserError(
                f"Kaplan's {label} needs >= 3 {desc}; these runs give {x.size}: add runs over a wider range of {what}"
            )
        out[label] = fit_power_law(x, y, what)
    out["exponents"] = {f"alpha_{s}": out[f"L({s})"]["exponent"] for s in ("N", "D", "C")}
    return out


def approach1(runs: Sequence[Run], n_grid: int = 1500) -> dict[str, Any]:
    """Hoffmann et al. 2022, approach 1 (section 3.1): the minimum over training curves at each compute.

    At each of `n_grid` log-spaced FLOP counts (the paper's 1500) the run whose curve, interpolated
    linearly in log C, is lowest gives N_opt and the tokens it had seen, D_opt; power laws
    N_opt = k_N C^a and D_opt = k_D C^b are fitted through those points. Points won by the smallest or
    largest size are left out: there the optimum may lie beyond the sizes tried, and keeping them
    flattens the fit (a came out 5% low on tests/scaling's synthetic curves, 2% without them).
    Caveat from the paper: a curve's early points are only fair if its learning-rate schedule was
    sized for them.
    """
    tracks = [r for r in runs if len(r.points()) >= 2]
    sizes = sorted({r.params for r in tracks})
    if len(sizes) < 4:
        raise UserError(
            f"approach 1 needs training curves ('curve' in {RESULTS}) of >= 4 model sizes; found {len(sizes)}"
        )
    curves = [np.array(r.points()) for r in tracks]  # (tokens, compute, loss) per point
    log_c = [np.log(c[:, 1]) for c in curves]
    grid = np.linspace(min(lc[0] for lc in log_c), max(lc[-1] for lc in log_c), n_grid)
    losses = np.full((len(tracks), n_grid), np.inf)
    for i, (lc, c) in enumerate(zip(log_c, curves)):
        inside = (grid >= lc[0]) & (grid <= lc[-1])
        losses[i, inside] = np.interp(grid[inside], lc, c[:, 2])
    winner = losses.argmin(axis=0)
    N_opt = np.array([tracks[i].params for i in winner], dtype=float)
    keep = np.isfinite(losses.min(axis=0)) & (N_opt > sizes[0]) & (N_opt < sizes[-1])
    C, N_opt = np.exp(grid[keep]), N_opt[keep]
    D_opt = np.array([tracks[i].tokens / tracks[i].flops for i in winner[keep]]) * C
    on_envelope = sorted({float(n) for n in N_opt})
    if len(on_envelope) < 2:
        raise UserError(
            "approach 1 needs the minimum-loss envelope to pass through >= 2 model sizes between the smallest "
            f"and the largest; it passes through {len(on_envelope)}: add sizes and longer curves"
        )
    a, log_kn = _loglog_line(C, N_opt)
    b, log_kd = _loglog_line(C, D_opt)
    return {
        "a": a, "b": b, "params_coef": math.exp(log_kn), "tokens_coef": math.exp(log_kd),
        "envelope_sizes": on_envelope, "envelope_points": int(C.size),
        "exponents": {"a": a, "b": b},
    }


# How far beyond the sizes tried (in log N) approach 2 still reads a profile's minimum: one decade.
# Hoffmann et al. 2022 (section 3.2, figure 3) fit parabolas to profiles whose minimum lies within
# them; a vertex far outside comes from a profile that hardly curves, where p2 is mostly noise and
# the vertex can land anywhere (e^10000 in review), so it says nothing about N_opt.
VERTEX_REACH = math.log(10.0)


def approach2(runs: Sequence[Run]) -> dict[str, Any]:
    """Hoffmann et al. 2022, approach 2 (section 3.2): a parabola through each isoFLOP profile.

    Per budget C, loss = p2 x^2 + p1 x + p0 with x = log N; its vertex is N_opt(C). D_opt(C) is read off
    the same profile (log D is fitted as a line in log N and taken at the vertex; with C = 6 N D that is
    C / (6 N_opt)). Then N_opt = k_N C^a and D_opt = k_D C^b across budgets. A profile needs >= 3 model
    sizes and upward curvature; a vertex outside the sizes tried is kept but flagged `extrapolated`, up to
    `VERTEX_REACH` beyond them.
    """
    budgets, skipped, thin = [], [], []  # thin: the budgets with too few sizes, also in skipped
    profiles = isoflop_profiles(runs)
    for C, members in profiles:
        sizes = {r.params for r in members}
        if len(sizes) < 3:
            skipped.append(f"C={C:.3g}: {len(sizes)} model size(s)")
            thin.append(skipped[-1])
            continue
        x = np.log([r.params for r in members])
        p2, p1, p0 = np.polyfit(x, [r.loss for r in members], 2)
        if p2 <= 0:
            skipped.append(f"C={C:.3g}: no minimum (loss does not curve up on both sides)")
            continue
        vertex = -p1 / (2 * p2)
        if not (math.isfinite(vertex) and x.min() - VERTEX_REACH <= vertex <= x.max() + VERTEX_REACH):
            where = f"N = 10^{vertex / math.log(10):.1f}" if math.isfinite(vertex) else "no finite N"
            skipped.append(f"C={C:.3g}: minimum at {where}, more than a decade outside the sizes tried "
                           "(the loss hardly curves; add sizes on both sides of its minimum)")
            continue
        slope, intercept = np.polyfit(x, np.log([r.tokens for r in members]), 1)
        budgets.append({
            "flops": C, "runs": len(members),
            "params_opt": float(np.exp(vertex)), "tokens_opt": float(np.exp(intercept + slope * vertex)),
            "loss_opt": float(p0 - p1 * p1 / (4 * p2)), "parabola": [float(p2), float(p1), float(p0)],
            "extrapolated": bool(not x.min() <= vertex <= x.max()),
        })
    if len(budgets) < 2:
        # Summarised, not listed: a size x budget grid makes every run a budget of its own.
        others = [why for why in skipped if why not in thin]
        reasons = [f"skipped {'; '.join(others[:2])}" + (f"; {len(others) - 2} more like these" if len(others) > 2 else "")
                   ] if others else []
        if thin:
            reasons.append(f"{len(thin)} of {len(profiles)} budgets have fewer than 3 model sizes: a size x budget grid "
                           "gives every run a budget of its own; isoFLOP profiles come from `flops:` in a sweep's grid")
        detail = f" ({'; '.join(reasons)})" if reasons else ""
        raise UserError(
            f"approach 2 needs isoFLOP profiles at >= 2 compute budgets with >= 3 model sizes each; "
            f"found {len(budgets)}{detail}"
        )
    C = [b["flops"] for b in budgets]
    a, log_kn = _loglog_line(C, [b["params_opt"] for b in budgets])
    b, log_kd = _loglog_line(C, [b["tokens_opt"] for b in budgets])
    if not all(math.isfinite(v) and abs(v) < _MAX_LOG for v in (a, b, log_kn, log_kd)):
        raise UserError(
            f"approach 2's optima do not follow a power law in C (N_opt ~ C^{a:.3g}); "
            "add budgets further apart and sizes on both sides of each budget's minimum"
        )
    return {
        "a": a, "b": b, "params_coef": math.exp(log_kn), "tokens_coef": math.exp(log_kd),
        "budgets": budgets, "skipped_budgets": skipped,
        "exponents": {"a": a, "b": b},
    }


# Hoffmann et al. 2022, appendix D.2: L-BFGS starts from every point of this grid over
# (e, a, b, alpha, beta) = (log E, log A, log B, alpha, beta): 5 x 6 x 6 x 5 x 5 = 4500 points.
INIT_GRID = np.array(list(itertools.product(
    np.arange(-1.0, 1.01, 0.5), np.arange(0.0, 25.1, 5.0), np.arange(0.0, 25.1, 5.0),
    np.arange(0.0, 2.01, 0.5), np.arange(0.0, 2.01, 0.5),
)))


def _log_loss(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray):
    """log L = LSE(a - alpha log N, b - beta log D, e), and the softmax weights of its three terms.

    theta is (5,) or (k, 5) as (e, a, b, alpha, beta); results are (n_runs,) or (k, n_runs). The
    weights are d LSE / d term, so the gradient needs no second pass.
    """
    e, a, b, alpha, beta = (theta[..., i, None] for i in range(5))
    t_n, t_d = a - alpha * log_n, b - beta * log_d
    m = np.maximum(np.maximum(t_n, t_d), e)  # subtracted before exp, so nothing overflows
    w_n, w_d, w_e = np.exp(t_n - m), np.exp(t_d - m), np.exp(e - m)
    total = w_n + w_d + w_e
    return m + np.log(total), (w_n / total, w_d / total, w_e / total)


def _huber(r: np.ndarray, delta: float) -> np.ndarray:
    return np.where(np.abs(r) <= delta, 0.5 * r * r, delta * (np.abs(r) - 0.5 * delta))


def _huber_objective(theta, log_n, log_d, log_l, delta) -> tuple[float, np.ndarray]:
    """Sum of Huber losses of the log-loss residuals, and its gradient in (e, a, b, alpha, beta)."""
    lse, (w_n, w_d, w_e) = _log_loss(theta, log_n, log_d)
    r = lse - log_l
    g = np.clip(r, -delta, delta)  # Huber'(r)
    grad = np.array([(g * w_e).sum(), (g * w_n).sum(), (g * w_d).sum(), -(g * w_n) @ log_n, -(g * w_d) @ log_d])
    return float(_huber(r, delta).sum()), grad


_MAX_LOG = 300.0  # |log| of a fitted coefficient beyond this (exp overflows near 709) means divergence


def approach3(runs: Sequence[Run], delta: float = 1e-3, starts: int = 4) -> dict[str, Any]:
    """Hoffmann et al. 2022, approach 3 (section 3.3, appendix D.2): fit L(N, D) = E + A/N^alpha + B/D^beta.

    Minimises sum_i Huber_delta(LSE(a - alpha log N_i, b - beta log D_i, e) - log L_i) over
    (e, a, b, alpha, beta), with E = exp(e), A = exp(a), B = exp(b), by L-BFGS (scipy's L-BFGS-B,
    unbounded) from the paper's grid of initialisations, keeping the best optimum. N is every parameter.

    Two departures from the paper. For speed, the objective is evaluated at all 4500 grid points and
    L-BFGS runs only from the `starts` best of them: on tests/scaling's synthetic studies (grid and
    isoFLOP designs, two seeds each) the best of all 4500 runs equals the best of these 4 to 2e-8 in
    every parameter, in ~30 s instead of ~35 ms. And the tolerances are near machine precision: the
    objective is ~1e-4 while L-BFGS-B's default ftol is relative to max(|f|, 1), so with the defaults
    most starts stop early, the premature convergence Besiroglu et al. 2024 found in the original fit.
    """
    n_sizes = len({r.params for r in runs})
    n_tokens = len({r.tokens for r in runs})
    if len(runs) < 6 or n_sizes < 3 or n_tokens < 3:
        raise UserError(
            "approach 3 fits 5 parameters and needs >= 6 runs over >= 3 model sizes and >= 3 token counts; "
            f"got {len(runs)} runs, {n_sizes} sizes, {n_tokens} token counts"
        )
    if starts < 1:
        raise UserError(f"starts must be >= 1, got {starts}")
    from scipy.optimize import minimize  # imported here: it costs the CLI's other verbs ~0.3 s to load

    log_n = np.log([r.params for r in runs])
    log_d = np.log([r.tokens for r in runs])
    log_l = np.log([r.loss for r in runs])
    on_grid = _huber(_log_loss(INIT_GRID, log_n, log_d)[0] - log_l, delta).sum(axis=-1)
    best = min(
        (
            minimize(
                _huber_objective, INIT_GRID[i], args=(log_n, log_d, log_l, delta), jac=True,
                method="L-BFGS-B", options={"ftol": 1e-15, "gtol": 1e-12},
            )
            for i in np.argsort(on_grid, kind="stable")[:starts]
        ),
        key=lambda res: res.fun,
    )
    e, a, b, alpha, beta = (float(v) for v in best.x)
    law = None
    if all(math.isfinite(v) and abs(v) < _MAX_LOG for v in (e, a, b, alpha, beta)):
        law = ParametricLaw(E=math.exp(e), A=math.exp(a), B=math.exp(b), alpha=alpha, beta=beta, name="approach 3")
    if law is None or not math.isfinite(law.G):  # G overflows too when alpha + beta is near 0
        # L-BFGS ran off to infinity: these runs do not pin down the law (the loss is not falling
        # with N and D across them, e.g. too few steps for the larger models).
        raise UserError(
            "approach 3 diverged: the runs do not determine L(N, D) = E + A/N^alpha + B/D^beta "
            "(does the loss fall with both N and D?); add runs with more tokens per model"
        )
    return {
        "law": law.to_dict(), "a": law.a, "b": law.b, "G": law.G,
        "huber_delta": delta, "objective": float(best.fun), "runs": len(runs),
        "exponents": {"alpha": alpha, "beta": beta, "a": law.a, "b": law.b},
    }


def held_out(runs: Sequence[Run], delta: float = 1e-3) -> dict[str, Any]:
    """The issue's check of a study: fit approach 3 on every run but the largest model's, predict that model.

    Returns the law fitted on the smaller sizes, one {tokens, observed, predicted, rel_error} per run
    of the largest model (by tokens), and the largest and mean relative error of the predictions.
    """
    largest = max(r.params for r in runs)
    smaller = [r for r in runs if r.params < largest]
    law = ParametricLaw(**approach3(smaller, delta)["law"])
    predictions = []
    for r in sorted((r for r in runs if r.params == largest), key=lambda r: r.tokens):
        predicted = float(law.loss(r.params, r.tokens))
        predictions.append({"tokens": r.tokens, "observed": r.loss, "predicted": predicted,
                            "rel_error": abs(predicted - r.loss) / r.loss})
    errors = [p["rel_error"] for p in predictions]
    return {"params": largest, "fit_on": len(smaller), "law": law.to_dict(), "predictions": predictions,
            "max_rel_error": max(errors), "mean_rel_error": sum(errors) / len(errors)}


# The largest share of failed resamples bootstrap still makes an interval of. The survivors are the
# resamples that happened to keep enough distinct sizes, not a random draw: past a tenth of them
# lost, their spread understates the real one (4 sizes for approach 1: 181 of 200 failed and the
# 19 left agreed exactly, a zero-width "95%" interval).
MAX_FAILED = 0.1


def bootstrap(
    runs: Sequence[Run],
    fn: Callable[[Sequence[Run]], dict[str, Any]],
    n: int = 200,
    seed: int = 0,
    level: float = 0.95,
    strata: Sequence[Sequence[Run]] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Percentile intervals of every exponent `fn(runs)["exponents"]` holds, over `n` resamples.

    Each resample draws runs with replacement (within each stratum when `strata` partitions the runs,
    so an isoFLOP design keeps its budgets) and refits. A resample that cannot be fitted (too few
    distinct sizes left, say) is counted in `failed` and not used; when more than `MAX_FAILED` of them
    fail there are no `intervals`, and `unavailable` says why. Hoffmann et al. 2022 (table 2) quote
    bootstrap 10th-90th percentiles, i.e. level=0.8; 0.95 is the default here. `progress` shows a bar
    on stderr.
    """
    if n < 2:
        raise UserError(f"bootstrap needs >= 2 resamples, got {n}")
    if not 0 < level < 1:
        raise UserError(f"bootstrap level must be in (0, 1), got {level}; 0.95 gives 95% intervals")
    groups = [list(g) for g in strata] if strata is not None else [list(runs)]
    rng = np.random.default_rng(seed)
    samples, failures = [], []
    for _ in tqdm(range(n), desc=f"bootstrap {getattr(fn, '__name__', 'fit')}", unit="fit", file=sys.stderr,
                  disable=not progress, leave=False):
        resample = [g[i] for g in groups for i in rng.integers(0, len(g), len(g))]
        try:
            samples.append(fn(resample)["exponents"])
        except UserError as e:
            failures.append(str(e))
    counts = {"level": level, "resamples": len(samples), "failed": len(failures)}
    if len(failures) > MAX_FAILED * n:  # also covers < 2 survivors, since n >= 2
        return {
            "unavailable": f"{len(failures)} of {n} resamples could not be refitted ({failures[0]}); "
                           "add runs so that a resample keeps enough distinct points",
            **counts,
        }
    q = [50 * (1 - level), 50 * (1 + level)]
    return {
        "intervals": {k: [float(v) for v in np.percentile([s[k] for s in samples], q)] for k in samples[0]},
        **counts,
    }


_FITS: dict[str, Callable[[Sequence[Run]], dict[str, Any]]] = {
    "kaplan": kaplan, "approach1": approach1, "approach2": approach2, "approach3": approach3,
}


def fit(
    directory: str | os.PathLike,
    approaches: Sequence[str] | None = None,
    plots: bool = True,
    n_bootstrap: int = 200,
    seed: int = 0,
    level: float = 0.95,
    progress: bool = True,
) -> dict[str, Any]:
    """Fit every approach to `directory/results.jsonl`; write `directory/fit.json` and the PNG plots.

    Args:
        directory: the scaling study; see `lmforge.scaling.runs` for the results.jsonl schema.
        approaches: any of "kaplan", "approach1", "approach2", "approach3"; None means all, and then an
            approach the runs cannot support is recorded as {"skipped": why} instead of failing.
        plots: write loss_vs_compute.png, isoflop.png (approach 2), fitted_vs_observed.png (approach 3).
        n_bootstrap: resamples for the intervals of every exponent; 0 for none.
        seed, level: of the bootstrap.
        progress: a bar on stderr while bootstrapping (approach 3 refits take ~35 ms each).

    Returns the content of fit.json: one section per approach, each with its `exponents` and, under
    `bootstrap`, their `intervals`. `lmforge scaling plan --law fit.json` reads approach 3's law.
    """
    directory = Path(directory)
    runs = read_runs(directory)
    names = APPROACHES if approaches is None else tuple(approaches)
    if not names or any(a not in APPROACHES for a in names):
        raise UserError(f"approaches must be a non-empty subset of {list(APPROACHES)}, got {list(names)}")
    if n_bootstrap < 0 or n_bootstrap == 1:
        raise UserError(f"n_bootstrap must be 0 (no intervals) or >= 2, got {n_bootstrap}")
    if n_bootstrap and not 0 < level < 1:  # else every approach's intervals would be skipped, silently
        raise UserError(f"bootstrap level must be in (0, 1), got {level}; 0.95 gives 95% intervals")
    result: dict[str, Any] = {"results": str(directory / RESULTS), "runs": len(runs)}
    for name in names:
        fn = _FITS[name]
        try:
            out = fn(runs)
        except UserError as e:
            if approaches is not None:
                raise
            result[name] = {"skipped": str(e)}
            continue
        if n_bootstrap:
            strata = [members for _, members in isoflop_profiles(runs)] if name == "approach2" else None
            try:
                out["bootstrap"] = bootstrap(runs, fn, n_bootstrap, seed, level, strata, progress)
            except UserError as e:
                out["bootstrap"] = {"skipped": str(e)}
        result[name] = out
    if all("skipped" in result[name] for name in names):
        reasons = " | ".join(f"{name}: {result[name]['skipped']}" for name in names)
        raise UserError(f"no approach could be fitted to {directory / RESULTS}: {reasons}")
    if plots:
        from lmforge.scaling.plots import write_plots  # matplotlib is imported only when plotting

        result["plots"] = [str(p) for p in write_plots(directory, runs, result)]
    atomic_write_json(directory / "fit.json", result)
    return result
