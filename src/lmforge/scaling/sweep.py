"""`lmforge scaling sweep`: train a grid of model sizes x token budgets and tabulate the results.

Each run is an ordinary `pretrain` run whose cosine schedule ends at its own token budget, so no
run is a truncated piece of a longer one (Hoffmann et al. 2022, section 3.1 and figure A1). A row
of DIR/results.jsonl (schema in `lmforge.scaling.runs`) is written as each run finishes; a sweep
that is started again skips finished runs and resumes an interrupted one from its last checkpoint.
A run's wall time is kept in DIR/runs/NAME/sweep-seconds.json while it trains (rewritten every
few seconds and when it stops), so the `seconds` of its row covers every attempt, interrupted ones
included; a SIGKILL loses at most the last few seconds.

N below is what the fits use: every parameter the model has, embeddings included (`flops()["params"]`).
An isoFLOP run of budget C trains D = C / (6 N) tokens, rounded up to whole steps.

The grid file (YAML):

    sizes: [2.0e4, 4.0e4, 8.0e4, 1.6e5, 3.2e5]   # target block parameters 12 * n_layer * n_embd^2 (pick the shapes)
    tokens: [1.0e6, 2.0e6, 4.0e6]                # training tokens per run ... or, for isoFLOP profiles,
    # flops: [1.0e12, 3.0e12]                    # budgets C, each run getting D = C / (6 N), N with embeddings
    aspect_ratio: 16                             # n_embd / n_layer, fixed across sizes (Kaplan et al. 2020, fig. 5)
    head_size: 16
    model: {context_length: 128}                 # any other ModelConfig fields
    train: {batch_size: 16, lr: 3.0e-3}          # any TrainConfig fields; max_steps comes from the budget
    evals: 4                                     # validation points per run (the curve approach 1 uses)
    objective: causal                            # or mlm / mlm+nsp, for an encoder grid (model: {arch: encoder})
"""

from __future__ import annotations

import dataclasses
import json
import math
import multiprocessing
import threading
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import yaml

from lmforge.checkpoint import check_run_out, find_checkpoints
from lmforge.config import ModelConfig, TrainConfig
from lmforge.data import load_meta
from lmforge.scaling.counting import flops
from lmforge.scaling.runs import RESULTS, parse_run, read_rows
from lmforge.train import OBJECTIVE_ARCH, Interrupted, pretrain
from lmforge.utils.device import resolve_device
from lmforge.utils.errors import UserError
from lmforge.utils.fs import atomic_write_text


@dataclass
class Grid:
    sizes: list[float]
    tokens: list[float] | None = None
    flops: list[float] | None = None
    aspect_ratio: float = 32.0
    head_size: int = 32
    model: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    evals: int = 4
    objective: str = "causal"


# Objectives a sweep trains: those on plain text, where a step holds batch x seq_len tokens (a
# seq2seq step holds padded pairs, which the budgets would miscount).
SWEEP_OBJECTIVES = ("causal", "mlm", "mlm+nsp")


@dataclass
class PlannedRun:
    name: str
    model: ModelConfig
    tokens: float
    budget: float | None


def load_grid(path: str | Path) -> Grid:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"grid file {path} does not exist; write one (see `lmforge scaling sweep --help`)") from None
    except (IsADirectoryError, UnicodeDecodeError) as e:
        reason = "a directory" if isinstance(e, IsADirectoryError) else "not UTF-8 text"
        raise UserError(f"grid file {path} is {reason}; pass a YAML file (see `lmforge scaling sweep --help`)") from None
    except yaml.YAMLError as e:
        raise UserError(f"{path} is not valid YAML ({' '.join(str(e).split())})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path} must be a YAML mapping with sizes and tokens (or flops)")
    names = {f.name for f in dataclasses.fields(Grid)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise UserError(f"{path}: unknown key(s) {unknown}; valid keys are {sorted(names)}")
    try:
        grid = Grid(**raw)
    except TypeError as e:
        raise UserError(f"{path}: {e}") from None
    if (grid.tokens is None) == (grid.flops is None):
        raise UserError(f"{path}: give exactly one of `tokens` (a size x budget grid) or `flops` (isoFLOP profiles)")
    for key in ("sizes", "tokens", "flops"):
        values = getattr(grid, key)
        if isinstance(values, list):  # YAML 1.1 reads 1e6 (no dot, no sign) as a string
            values = [_number(v) for v in values]
            setattr(grid, key, values)
        if values is not None and (not values or not all(_positive(v) for v in values)):
            raise UserError(f"{path}: `{key}` must be a non-empty list of positive finite numbers, got {values!r}")
    grid.aspect_ratio = _number(grid.aspect_ratio)
    for key, kinds in (("aspect_ratio", (int, float)), ("head_size", (int,)), ("evals", (int,))):
        value = getattr(grid, key)
        if not isinstance(value, kinds) or not _positive(value):
            whole = "a whole number" if kinds == (int,) else "a finite number"
            raise UserError(f"{path}: `{key}` must be {whole} > 0, got {value!r}")
    if grid.objective not in SWEEP_OBJECTIVES:
        raise UserError(f"{path}: `objective` must be one of {list(SWEEP_OBJECTIVES)}, got {grid.objective!r} "
                        "(a sweep counts tokens on plain text)")
    return grid


def _positive(v: Any) -> bool:
    """A number > 0 that is not nan or inf (nan > 0 is False, but so is nan <= 0)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def _number(v: Any) -> Any:
    try:
        return float(v) if isinstance(v, str) else v
    except ValueError:
        return v


def shape_for(target: float, grid: Grid) -> ModelConfig:
    """The config whose blocks hold about `target` parameters (12 * n_layer * n_embd^2) at the grid's aspect ratio.

    n_embd = n_layer * aspect_ratio, so 12 * n_embd^3 / aspect_ratio = target; n_embd is rounded to
    whole heads and n_layer to at least one.
    """
    hs = grid.head_size
    width = max(round((target * grid.aspect_ratio / 12) ** (1 / 3) / hs), 1) * hs
    layers = max(round(width / grid.aspect_ratio), 1)
    actual = 12 * layers * width * width
    if not 0.5 <= actual / target <= 2.0:
        raise UserError(
            f"no shape with head size {hs} and aspect ratio {grid.aspect_ratio:g} has about {target:.3g} block "
            f"parameters (nearest: {layers} layers x {width} wide = {actual:.3g}); change the size, head_size or aspect_ratio"
        )
    try:
        return ModelConfig.from_dict({**grid.model, "n_layer": layers, "n_embd": width, "n_head": width // hs})
    except TypeError as e:
        raise UserError(f"grid `model`: {e}") from None


def plan_runs(grid: Grid, data: str | Path | None = None) -> list[PlannedRun]:
    """Every (model, token budget) run of the grid, in order.

    isoFLOP budgets need the real parameter count N (embeddings included, as the fits use it), hence
    the vocabulary: the grid's `model.vocab_size`, else that of the prepared `data` (read only then).
    """
    models, shapes = [], {}
    for size in grid.sizes:
        model = shape_for(size, grid)
        shape = (model.n_layer, model.n_embd)
        if shape in shapes:  # the same model twice: its runs would share names and be trained once
            raise UserError(
                f"sizes {shapes[shape]:.3g} and {size:.3g} both give {shape[0]} layers x {shape[1]} wide at head size "
                f"{grid.head_size}; space the sizes further apart or lower head_size for finer widths"
            )
        shapes[shape] = size
        models.append(model)
    wants = OBJECTIVE_ARCH[grid.objective]
    if models[0].arch != wants:
        fits = [k for k, v in OBJECTIVE_ARCH.items() if v == models[0].arch and k in SWEEP_OBJECTIVES]
        raise UserError(f"the grid's objective {grid.objective} trains {wants} models but model.arch is {models[0].arch}; "
                        + (f"set `objective: {fits[0]}`" if fits else "a sweep trains decoder (causal) and encoder (mlm, mlm+nsp) models"))
    if grid.flops and models[0].vocab_size is None:
        if data is None:
            raise UserError("isoFLOP budgets need the vocabulary size to count N; set model.vocab_size in the grid "
                            "or pass the prepared data directory")
        models = [m.replace(vocab_size=load_meta(data)["vocab_size"]) for m in models]
    runs = []
    for model in models:
        if grid.tokens:
            budgets = [(d, None) for d in grid.tokens]
        else:
            n = flops(model, 0)["params"]
            budgets = [(c / (6 * n), c) for c in grid.flops]
        for tokens, budget in budgets:
            tag = f"C{budget:.2g}" if budget else f"D{tokens:.2g}"
            runs.append(PlannedRun(f"L{model.n_layer}-d{model.n_embd}-{tag}".replace("+", ""), model, tokens, budget))
    return runs


def sweep(
    grid_file: str | Path,
    data: str | Path,
    out: str | Path,
    log: Callable[..., None] = print,
    progress: bool = True,
    devices: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """Run every planned run not yet in OUT/results.jsonl; return all rows.

    With several `devices` (e.g. cuda:0 cuda:1), runs go to one worker process per device, each
    taking the next unfinished run as it frees up; a run's result does not depend on its device
    or order, since every run is a pure function of its config and seed.
    """
    grid = load_grid(grid_file)
    check_run_out(out)  # before anything is written: not in the data, which `prepare` replaces as a whole
    out = Path(out)
    planned = plan_runs(grid, data)
    results = out / RESULTS
    rows = []
    for where, row in read_rows(results) if results.exists() else []:
        parse_run(row, where)  # a row `fit` would refuse is refused now, not after the sweep has trained
        if not isinstance(row.get("name"), str):
            # Refused rather than skipped: the sweep cannot tell which planned run such a row is, so it
            # would train that run again, and a foreign row would slip into the study's fits unseen.
            raise UserError(
                f"{where}: this row has no 'name', so `lmforge scaling sweep` did not write it and cannot tell "
                f"which planned run it is; move it out of {results}, or sweep into a new directory"
            )
        rows.append(row)
    done = {row["name"] for row in rows}
    load_meta(data)  # not prepared data: one line now, not a run directory started in OUT first
    try:
        base = TrainConfig(**{**grid.train, "max_steps": 1})  # validates the train keys once, up front
    except TypeError as e:
        raise UserError(f"grid `train`: {e}") from None
    for run in planned:  # a budget too small for its schedule would silently train more: refuse up front
        _steps(run, grid.evals, base)
    for device in devices or [base.device]:  # e.g. cuda on a machine without it: before any run starts
        resolve_device(device)
    todo = [(i, run) for i, run in enumerate(planned, 1) if run.name not in done]

    def record(i: int, row: dict[str, Any]) -> None:
        rows.append(row)
        atomic_write_text(results, "".join(json.dumps(r) + "\n" for r in rows))
        log(f"[{i}/{len(planned)}] {row['name']}: {row['config']['n_layer']} layers x {row['config']['n_embd']}, "
            f"{row['tokens']:.3g} tokens: val loss {row['loss']:.4f} in {row['seconds']:.0f}s")

    if not devices or len(devices) == 1:
        for i, run in todo:
            train = base.replace(device=devices[0]) if devices else base
            record(i, _train_one(run, grid.evals, train, str(data), str(out), progress, grid.objective))
        return rows
    # One worker per device: `spawn` gives each a fresh CUDA context; the device queue hands them out.
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Manager().Queue()
    for device in devices:
        queue.put(device)
    with ProcessPoolExecutor(len(devices), mp_context=ctx, initializer=_claim_device, initargs=(queue,)) as pool:
        futures = {pool.submit(_train_one, run, grid.evals, base, str(data), str(out), False, grid.objective): i
                   for i, run in todo}
        for future in as_completed(futures):
            record(futures[future], future.result())
    return rows


_DEVICE: str | None = None  # the device of this worker process


def _claim_device(queue) -> None:
    global _DEVICE
    _DEVICE = queue.get()


def _steps(run: PlannedRun, evals: int, train: TrainConfig) -> tuple[int, int]:
    """(optimizer steps, tokens per step) of a run: its budget rounded up to whole steps."""
    tokens_per_step = train.batch_size * train.grad_accum * (train.seq_len or run.model.context_length)
    steps = math.ceil(run.tokens / tokens_per_step)
    if steps < evals:
        what = f"budget C={run.budget:.3g} gives it {run.tokens:.3g} tokens" if run.budget else f"{run.tokens:.3g} tokens"
        raise UserError(
            f"run {run.name}: {what}, fewer than evals={evals} steps of {tokens_per_step} tokens; "
            "raise the budget, or lower train.batch_size or evals"
        )
    return steps, tokens_per_step


SECONDS_FILE = "sweep-seconds.json"  # in a run's directory: wall time of all its attempts so far
_HEARTBEAT_S = 5.0


def _stopwatch(run_dir: Path, fn: Callable[[], Any]) -> tuple[Any, float]:
    """(fn(), wall seconds of this run over every attempt), keeping the total in run_dir/SECONDS_FILE.

    The file is rewritten every few seconds by a thread and once more when fn returns or raises, so an
    interrupted attempt's time survives into the next one, a SIGKILLed one's up to the last write.
    fn must make run_dir before it trains: until then the stopwatch writes nothing.
    """
    path = run_dir / SECONDS_FILE
    try:
        before = float(json.loads(path.read_text())["seconds"])
    except (OSError, ValueError, KeyError, TypeError):
        before = 0.0
    t0 = time.perf_counter()
    stop = threading.Event()

    def save() -> float:
        total = before + time.perf_counter() - t0
        atomic_write_text(path, json.dumps({"seconds": total}) + "\n")  # creates run_dir, or says why it cannot
        return total

    def tick() -> None:
        while not stop.wait(_HEARTBEAT_S):
            if run_dir.exists():
                save()

    thread = threading.Thread(target=tick, name="sweep-stopwatch", daemon=True)
    thread.start()
    started = run_dir.exists()
    try:
        result = fn()
    finally:
        stop.set()
        thread.join()
        # An attempt refused before it made its run directory (a bad option, data that does not fit)
        # trained nothing: it leaves no directory behind either.
        total = save() if started or run_dir.exists() else 0.0
    return result, total


def _train_one(run: PlannedRun, evals: int, base: TrainConfig, data: str, out: str, progress: bool,
               objective: str) -> dict[str, Any]:
    """Train one planned run (resuming it if it was interrupted) and return its results.jsonl row."""
    if _DEVICE is not None:
        base = base.replace(device=_DEVICE)
    steps, tokens_per_step = _steps(run, evals, base)
    train = base.replace(
        max_steps=steps, warmup_steps=min(base.warmup_steps, steps // 10), eval_interval=math.ceil(steps / evals),
        ckpt_interval=max(steps // 4, 1), keep_checkpoints=1, tensorboard=False,
    )
    run_dir = Path(out) / "runs" / run.name
    resume = bool(find_checkpoints(run_dir))  # an interrupted attempt left a checkpoint: continue from it
    try:
        result, seconds = _stopwatch(run_dir, lambda: pretrain(data, run_dir, run.model, train, resume=resume,
                                                               objective=objective, progress=progress, log=lambda *a: None))
    except Interrupted as e:  # its message names `pretrain --resume`; a sweep resumes by running again
        raise UserError(f"run {run.name} interrupted at step {e.step}; start the same sweep again to resume it") from None
    if result.val_loss is None:
        raise UserError(f"{data} has no validation split large enough to score runs; prepare it with --val-fraction 0.1")
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    model = ModelConfig.from_dict(json.loads((result.checkpoint / "config.json").read_text())["model"])
    tokens = steps * tokens_per_step
    count = flops(model, tokens, seq_len=train.seq_len or model.context_length)
    row = {
        "name": run.name, "params": count["params"], "params_no_embed": count["params_no_embed"],
        "tokens": tokens, "flops": 6.0 * count["params"] * tokens, "flops_chinchilla": count["flops_chinchilla"],
        "loss": result.val_loss, "seconds": seconds,
        "curve": [[m["step"] * tokens_per_step, m["val_loss"]] for m in metrics if m["kind"] == "val"],
        "config": model.to_dict(),
    }
    if run.budget is not None:
        row["budget"] = run.budget
    return row
