"""`lmforge scaling sweep`: train a grid of model sizes x token budgets and tabulate the results.

Each run is an ordinary `pretrain` run whose cosine schedule ends at its own token budget, so no
run is a truncated piece of a longer one (Hoffmann et al. 2022, section 3.1 and figure A1). A row
of DIR/results.jsonl (schema in `lmforge.scaling.runs`) is written as each run finishes; a sweep
that is started again skips finished runs and resumes an interrupted one from its last checkpoint.
A run's wall time is kept in DIR/runs/NAME/sweep-seconds.json while it trains (rewritten every
few seconds and when it stops), so the `seconds` of its row covers every attempt, interrupted ones
included; a SIGKILL loses at most the last few seconds. What all runs of a sweep share (the data's
tokenizer and split sizes, the training settings, the model's settings but its shape) is kept in
DIR/sweep.json and in every row: a sweep started again into the same DIR with other data or
settings is refused, since its runs would mix with the earlier ones in one results.jsonl.

N below is what the fits use: every parameter the model has, embeddings included (`flops()["params"]`).
An isoFLOP run of budget C trains D = C / (6 N) tokens, rounded up to whole steps.

The grid file (YAML):

    sizes: [2.0e4, 4.0e4, 8.0e4, 1.6e5, 3.2e5]   # target block parameters 12 * n_layer * n_embd^2 (see shape_for)
    tokens: [1.0e6, 2.0e6, 4.0e6]                # training tokens per run ... or, for isoFLOP profiles,
    # flops: [1.0e12, 3.0e12]                    # budgets C, each run getting D = C / (6 N), N with embeddings
    aspect_ratio: 16                             # n_embd / n_layer, fixed across sizes (Kaplan et al. 2020, fig. 5)
    head_size: 16
    model: {context_length: 128}                 # a `preset` (its architecture, not its shape) and ModelConfig
                                                 # fields but n_layer, n_embd, n_head, which the sweep chooses
    train: {batch_size: 16, lr: 3.0e-3}          # any TrainConfig fields; max_steps comes from the budget
    evals: 4                                     # validation points per run (the curve approach 1 uses)
    objective: causal                            # or mlm / mlm+nsp, for an encoder grid (model: {arch: encoder})
"""

from __future__ import annotations

import dataclasses
import json
import math
import multiprocessing
import re
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import yaml

from lmforge.checkpoint import check_run_out, find_checkpoints, load_checkpoint
from lmforge.config import PRESETS, ModelConfig, TrainConfig
from lmforge.config.model import check_scalar_types
from lmforge.data import load_meta
from lmforge.scaling.counting import flops
from lmforge.scaling.runs import RESULTS, finite_number, parse_run, read_rows, setting_differences, sweep_settings
from lmforge.train import OBJECTIVE_ARCH, Interrupted, pretrain
from lmforge.utils.device import resolve_device
from lmforge.utils.errors import UserError
from lmforge.utils.fs import atomic_write_json, atomic_write_text, read_json


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
        if values is not None and (not isinstance(values, list) or not values or not all(_positive(v) for v in values)):
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
    return finite_number(v) and v > 0


def _number(v: Any) -> Any:
    try:
        return float(v) if isinstance(v, str) else v
    except ValueError:
        return v


def _floats(cls: type, settings: dict[str, Any]) -> dict[str, Any]:
    """`settings` with the numeric strings of `cls`'s float fields as numbers: YAML 1.1 reads `lr: 3e-3`
    (no dot) as a string, which `--train.lr 3e-3` and `pretrain --config` take as the number."""
    floats = {f.name for f in dataclasses.fields(cls) if str(f.type) == "float"}
    return {k: _number(v) if k in floats else v for k, v in settings.items()}


# A shape the aspect ratio gives (the width rounded to whole heads, then the depth) that lands within this
# factor of its target is kept: that was the whole rule before the search below, so sweeps begun under it
# keep their shapes, hence their run names, and resume.
KEEP_WITHIN = 1.125
# What leaving the aspect ratio costs in the search, per unit of |log(aspect / aspect_ratio)|, against
# |log(N / target)|: small, since the ratio is a loose optimum (Kaplan et al. 2020, figure 5, shows loss
# within a few percent over a wide range of shapes) and being near the size asked for matters more.
ASPECT_PENALTY = 0.2
# Chosen for each size by the sweep; the head size is the grid's `head_size`.
SHAPE_KEYS = ("n_layer", "n_embd", "n_head")
# Sized to a preset's own width: an absolute MLP width, and key/value heads that must divide its n_head.
_PRESET_SIZED = ("n_kv_head", "mlp_hidden")


def shape_for(target: float, grid: Grid) -> ModelConfig:
    """The config whose blocks hold about `target` parameters (12 * n_layer * n_embd^2) near the grid's aspect ratio.

    n_embd = n_layer * aspect_ratio gives 12 * n_embd^3 / aspect_ratio = target. That width rounded to
    whole heads, and the depth it gives rounded, is the shape if it lands within KEEP_WITHIN of the
    target. Rounding the width first can land far where closer shapes exist (1.47x for 1e5 at aspect 24,
    head size 16, where 2 x 64 holds 0.98x), so otherwise every depth up to four times the ideal one,
    each with the two widths of whole heads around its exact width, is scored by |log(N / target)| +
    ASPECT_PENALTY * |log(aspect / aspect_ratio)|, and the lowest wins. A shape more than 2x off is refused.
    """
    hs, aspect = grid.head_size, grid.aspect_ratio

    def off(shape: tuple[int, int]) -> float:  # |log(N / target)|
        return abs(math.log(12 * shape[0] * shape[1] ** 2 / target))

    width = max(round((target * aspect / 12) ** (1 / 3) / hs), 1) * hs
    layers = max(round(width / aspect), 1)
    if off((layers, width)) > math.log(KEEP_WITHIN):
        deepest = math.ceil(4 * (target / (12 * aspect**2)) ** (1 / 3)) + 1
        nearby = [(n, k * hs) for n in range(1, deepest + 1)
                  for k in sorted({max(f((target / (12 * n)) ** 0.5 / hs), 1) for f in (math.floor, math.ceil)})]
        layers, width = min(nearby, key=lambda shape: off(shape) + ASPECT_PENALTY * abs(math.log(shape[1] / shape[0] / aspect)))
    if off((layers, width)) > math.log(2):
        raise UserError(
            f"no shape with head size {hs} and aspect ratio {aspect:g} has about {target:.3g} block parameters "
            f"(nearest: {layers} layers x {width} wide = {12 * layers * width**2:.3g}); change the size, head_size or aspect_ratio"
        )
    try:
        return ModelConfig.from_dict({**_model_settings(grid), "n_layer": layers, "n_embd": width, "n_head": width // hs})
    except TypeError as e:
        raise UserError(f"grid `model`: {e}") from None


def _model_settings(grid: Grid) -> dict[str, Any]:
    """The grid's `model`, its `preset` expanded as `pretrain --model.preset` does (the preset's values
    under the grid's own) but for the preset's shape, which the sweep chooses."""
    model = grid.model
    if not isinstance(model, dict):
        raise UserError(f"grid `model` must map ModelConfig fields to values, got {model!r}")
    fixed = [key for key in SHAPE_KEYS if key in model]
    if fixed:
        raise UserError(f"grid `model` sets {', '.join(fixed)}, which the sweep chooses for each size; remove "
                        f"{'it' if len(fixed) == 1 else 'them'} and set the grid's head_size or aspect_ratio instead")
    model = _floats(ModelConfig, model)
    name = model.get("preset")
    if name is None:
        return model
    if not isinstance(name, str) or name not in PRESETS:
        raise UserError(f"grid `model`: unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return {**{k: v for k, v in PRESETS[name].items() if k not in SHAPE_KEYS + _PRESET_SIZED}, **model}


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
    runs, named = [], {}
    for model in models:
        if grid.tokens:
            budgets = [(d, None) for d in grid.tokens]
        else:
            n = flops(model, 0)["params"]
            budgets = [(c / (6 * n), c) for c in grid.flops]
        for tokens, budget in budgets:
            tag = f"C{budget:.2g}" if budget else f"D{tokens:.2g}"
            name = f"L{model.n_layer}-d{model.n_embd}-{tag}".replace("+", "")
            value = budget or tokens
            if name in named:  # one run directory for both: the second would "resume" the first's finished run
                key = "tokens" if grid.tokens else "flops"
                raise UserError(f"`{key}` values {named[name]:g} and {value:g} both give run name {name} (names keep 2 "
                                "significant digits); remove the repeat or space the values further apart")
            named[name] = value
            runs.append(PlannedRun(name, model, tokens, budget))
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
    or order, since every run is a pure function of its config and seed. When a run fails, the runs
    not yet started are dropped, those in progress finish and are recorded, and the failure is raised.
    """
    grid = load_grid(grid_file)
    check_run_out(out)  # before anything is written: not in the data, which `prepare` replaces as a whole
    out = Path(out)
    planned = plan_runs(grid, data)
    results = out / RESULTS
    rows, recorded = [], []  # recorded: (file:line, sweep settings) of the rows that hold them
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
        recorded.append((where, sweep_settings(row, where)))
    done = {row["name"] for row in rows}
    meta = load_meta(data)  # not prepared data: one line now, not a run directory started in OUT first
    base = _train_config(grid)
    for run in planned:  # a budget too small for its schedule would silently train more: refuse up front
        _steps(run, grid.evals, base)
    seq_len = base.seq_len or planned[0].model.context_length
    val = meta["splits"]["val"].get("tokens")  # parallel pairs have none: pretrain refuses those data itself
    if val is not None and val <= seq_len:  # else the runs would train, then have no loss to report
        raise UserError(f"{data} holds {val} validation tokens, no more than one window of seq_len {seq_len}, so no run "
                        "could be scored; prepare it with a larger --val-fraction (such as 0.1)")
    for device in devices or [base.device]:  # e.g. cuda on a machine without it: before any run starts
        resolve_device(device)
    settings = _settings(grid, planned[0].model, base, meta)
    # A run binds the study to its settings once it has a row or a checkpoint to resume from; one that
    # failed before its first checkpoint (diverged, say) left nothing that a retry under new settings would mix with.
    trained = bool(rows) or any(find_checkpoints(run) for run in (out / "runs").glob("*"))
    _check_settings(out, settings, recorded, trained)
    _check_same_runs(planned, {row["name"]: (where, row) for (where, _), row in zip(recorded, rows)}, out, grid.evals, base)
    todo = [(i, run) for i, run in enumerate(planned, 1) if run.name not in done]
    if todo:  # before the first run trains: an interrupted run resumes only under these settings
        atomic_write_json(out / SETTINGS, settings)

    def record(i: int, row: dict[str, Any]) -> None:
        row["sweep"] = settings
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
    failure = None
    with ProcessPoolExecutor(len(devices), mp_context=ctx, initializer=_claim_device, initargs=(queue,)) as pool:
        futures = {pool.submit(_train_one, run, grid.evals, base, str(data), str(out), False, grid.objective): i
                   for i, run in todo}
        pending = set(futures)
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                if future.exception() is None:
                    record(futures[future], future.result())
                    continue
                log(f"[{futures[future]}/{len(planned)}] failed: {future.exception()}")
                if failure is None:
                    # Said now, not after every queued run has trained: the runs still queued are dropped, and
                    # those the workers hold (training, or next in line: the pool hands out one more than it
                    # has workers) finish and are recorded. Future.cancel drops them at once, where
                    # shutdown(cancel_futures=True) cancels later and never wakes `wait`, which would then hang.
                    failure = future.exception()
                    pending = {f for f in pending if not f.cancel()}
                    log(f"dropping the queued runs; finishing the {len(pending)} the workers already hold")
    if failure is not None:
        raise failure
    return rows


_DEVICE: str | None = None  # the device of this worker process


def _claim_device(queue) -> None:
    global _DEVICE
    _DEVICE = queue.get()


def _train_config(grid: Grid) -> TrainConfig:
    """The grid's `train` as a TrainConfig (max_steps comes from each run's budget), checked up front."""
    if not isinstance(grid.train, dict):
        raise UserError(f"grid `train` must map TrainConfig fields to values, got {grid.train!r}")
    train = _floats(TrainConfig, grid.train)
    check_scalar_types(TrainConfig, train, "train")  # "8" for an int: the field and its type, not a bare '<'
    try:
        return TrainConfig(**{**train, "max_steps": 1})
    except TypeError as e:
        raise UserError(f"grid `train`: {e}") from None


SETTINGS = "sweep.json"  # in OUT: what every run of the sweep shares (`_settings`)
# TrainConfig fields that the sweep sets per run, or that change neither what a run learns nor how it is
# scored (where and how fast it runs, how often it logs): left out of the settings its runs share.
_UNSHARED = {"max_steps", "eval_interval", "ckpt_interval", "keep_checkpoints", "tensorboard", "log_interval",
             "device", "compile", "compile_mode", "threads", "chunked_loss", "parallel"}


def _settings(grid: Grid, model: ModelConfig, train: TrainConfig, meta: dict[str, Any]) -> dict[str, Any]:
    """What every run of a sweep shares: the data (its tokenizer and split sizes: two data directories
    that agree on these hold the same tokens, near enough), the training settings and the model's but
    its shape. Kept in OUT/sweep.json and in every row."""
    splits = meta["splits"]
    return {
        "data": {"tokenizer_sha256": meta.get("tokenizer_sha256"),
                 **{f"{split}_tokens": splits[split].get("tokens") for split in ("train", "val")}},
        "train": {**{k: v for k, v in train.to_dict().items() if k not in _UNSHARED}, "objective": grid.objective},
        "model": {k: v for k, v in model.to_dict().items() if k not in (*SHAPE_KEYS, "vocab_size", "preset")},
    }


def _check_settings(out: Path, settings: dict[str, Any], recorded: list[tuple[str, dict | None]], trained: bool) -> None:
    """Refuse to sweep into an OUT whose runs were trained with other settings than `settings`: its
    rows would mix with the new ones in one results.jsonl, and an interrupted run would resume under
    the new settings. `recorded` holds each row's settings; OUT/sweep.json counts once a run has `trained`
    (a sweep refused before its first run, or whose runs failed before a checkpoint, left it, and nothing
    depends on it)."""
    path = out / SETTINGS
    if trained and path.exists():
        kept = read_json(path, "restore it, or sweep into another --out")
        if not isinstance(kept, dict):
            raise UserError(f"{path} holds no sweep settings; restore it, or sweep into another --out")
        recorded = [*recorded, (str(path), kept)]
    for where, old in recorded:
        differences = setting_differences(old, settings) if old is not None else ""
        if differences:
            raise UserError(f"{out} holds runs swept with other data or settings ({where}: {differences}); "
                            "sweep into another --out, or restore those settings to continue that sweep")


def _check_same_runs(planned: list[PlannedRun], rows: dict[str, tuple[str, dict[str, Any]]], out: Path, evals: int,
                     train: TrainConfig) -> None:
    """Refuse a planned run whose name OUT already holds, as a row or an interrupted run's checkpoint, for
    another shape or budget (a grid edited between sweeps: names keep 2 significant digits and no head
    count), which the sweep would otherwise take as done or resume under a schedule it was not begun with."""
    for run in planned:
        steps, per_step = _steps(run, evals, train)
        want = {**{k: getattr(run.model, k) for k in SHAPE_KEYS}, "tokens": steps * per_step}
        if run.name in rows:
            where, row = rows[run.name]
            found = {**{k: (row.get("config") or {}).get(k) for k in SHAPE_KEYS}, "tokens": row.get("tokens")}
        elif saved := find_checkpoints(out / "runs" / run.name):
            where, ckpt = str(saved[-1]), load_checkpoint(saved[-1])
            state = ckpt.trainer_state if isinstance(ckpt.trainer_state, dict) else {}
            max_steps = state["train"].get("max_steps") if isinstance(state.get("train"), dict) else None
            if not isinstance(max_steps, int):  # a damaged trainer state: the resume refuses it in its own words
                continue
            found = {**{k: getattr(ckpt.model_config, k) for k in SHAPE_KEYS}, "tokens": max_steps * per_step}
        else:
            continue
        differences = [f"{k} {found[k]} where the grid now plans {v}" for k, v in want.items() if found[k] != v]
        if differences:
            raise UserError(f"{where}: run {run.name} was swept with {', '.join(differences)}; the grid changed under the "
                            "same run name: sweep into another --out, or restore the grid to continue that sweep")


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


def _stopwatch(run_dir: Path, fn: Callable[[], Any], resume: bool) -> tuple[Any, float]:
    """(fn(), wall seconds of this run over every attempt since it last started from scratch), keeping the
    total in run_dir/SECONDS_FILE; `resume`: fn goes on from an earlier attempt's checkpoint.

    The file is rewritten every few seconds by a thread and once more when fn returns or raises, so an
    interrupted attempt's time survives into the next one, a SIGKILLed one's up to the last write.
    fn must make run_dir before it trains: until then the stopwatch writes nothing.
    """
    path = run_dir / SECONDS_FILE
    try:  # an attempt that left no checkpoint (failed before one) trained nothing this one builds on
        before = float(json.loads(path.read_text())["seconds"]) if resume else 0.0
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
                                                               objective=objective, progress=progress, log=lambda *a: None),
                                     resume)
    except Interrupted as e:  # its message names `pretrain --resume`; a sweep resumes by running again
        raise UserError(f"run {run.name} interrupted at step {e.step}; start the same sweep again to resume it") from None
    except UserError as e:  # pretrain's advice names its flags, where a sweep's runs take their settings from the grid
        raise UserError(f"run {run.name}: " + re.sub(r"--(train|model)\.(\w+)", r"the grid's \1: {\2}", str(e))) from None
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    model = ModelConfig.from_dict(json.loads((result.checkpoint / "config.json").read_text())["model"])
    tokens = steps * tokens_per_step
    count = flops(model, tokens, seq_len=train.seq_len or model.context_length)
    row = {
        "name": run.name, "params": count["params"], "params_no_embed": count["params_no_embed"],
        "tokens": tokens, "flops": count["flops_6nd"], "flops_chinchilla": count["flops_chinchilla"],
        "loss": result.val_loss, "seconds": seconds,
        "curve": [[m["step"] * tokens_per_step, m["val_loss"]] for m in metrics if m["kind"] == "val"],
        "config": model.to_dict(),
    }
    if run.budget is not None:
        row["budget"] = run.budget
    return row
