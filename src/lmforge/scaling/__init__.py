"""Scaling laws (layer 4): count FLOPs, fit laws to a table of runs, plan compute-optimal training.

    sweep(grid) ──> results.jsonl (a row per run) ──> fit(DIR) ──> fit.json ──> plan(law=...)
"""

from lmforge.scaling.fitting import (
    APPROACHES,
    approach1,
    approach2,
    approach3,
    bootstrap,
    fit,
    fit_power_law,
    held_out,
    kaplan,
)
from lmforge.scaling.counting import flops
from lmforge.scaling.laws import BESIROGLU, CHINCHILLA, ParametricLaw, load_law
from lmforge.scaling.plan import GPU_PEAK_FLOPS, plan
from lmforge.scaling.runs import Run, frontier, isoflop_profiles, read_runs
from lmforge.scaling.sweep import load_grid, plan_runs, shape_for, sweep

__all__ = [
    "APPROACHES", "BESIROGLU", "CHINCHILLA", "GPU_PEAK_FLOPS", "ParametricLaw", "Run",
    "approach1", "approach2", "approach3", "bootstrap", "fit", "fit_power_law", "flops", "frontier",
    "held_out", "isoflop_profiles", "kaplan", "load_grid", "load_law", "plan", "plan_runs", "read_runs", "shape_for",
    "sweep",
]
