import json
import os
import re
import signal
from pathlib import Path

import pytest

from lmforge.checkpoint import find_checkpoints
from lmforge.config import ModelConfig
from lmforge.scaling import (
    flops,
    isoflop_profiles,
    load_grid,
    plan_runs,
    read_runs,
    shape_for,
    sweep,
)
from lmforge.scaling.sweep import SECONDS_FILE, _train_config
from lmforge.train import checkpointing
from lmforge.utils.errors import UserError

GRID = """
sizes: [2.0e4, 5.0e4]
tokens: [4096, 8192]
aspect_ratio: 16
head_size: 16
model: {context_length: 32}
train: {batch_size: 4, lr: 3.0e-3, device: cpu, compile: false, threads: 1, eval_batches: 2}
evals: 2
"""


def test_shapes_follow_the_aspect_ratio(tmp_path):
    (tmp_path / "g.yaml").write_text(GRID)
    grid = load_grid(tmp_path / "g.yaml")
    for target in (2e4, 5e4, 1e6, 1e8):
        cfg = shape_for(target, grid)
        n = 12 * cfg.n_layer * cfg.n_embd**2
        assert 0.5 <= n / target <= 2.0 and cfg.head_size == 16
    # 2e4: n_embd = (2e4 * 16 / 12)^(1/3) = 29.9 -> 32 (whole heads), n_layer = 32 / 16 = 2: 1.23x, and no
    # shape near aspect 16 comes closer (6 x 16 holds 0.92x at aspect 2.7).
    assert [r.name for r in plan_runs(grid)][:2] == ["L2-d32-D4.1e03", "L2-d32-D8.2e03"]


def test_sweep_writes_rows_and_resumes(tmp_path, data_dir):
    (tmp_path / "g.yaml").write_text(GRID)
    logs = []
    rows = sweep(tmp_path / "g.yaml", data_dir, tmp_path / "study", log=logs.append, progress=False)
    assert len(rows) == 4 and len(read_runs(tmp_path / "study")) == 4
    row = rows[0]
    assert row["tokens"] == 4096 and len(row["curve"]) == 2 and row["curve"][-1][1] == row["loss"]
    # N and C from the real count of the model built (what the fits use), not 12 * n_layer * n_embd^2.
    count = flops(ModelConfig.from_dict(row["config"]), row["tokens"])
    assert row["params"] == count["params"] > row["params_no_embed"] == count["params_no_embed"] > 12 * 2 * 32 * 32
    assert row["flops"] == 6 * row["params"] * row["tokens"]
    assert row["flops_chinchilla"] == count["flops_chinchilla"] and row["seconds"] > 0
    # A longer grid: only the new runs train.
    (tmp_path / "g.yaml").write_text(GRID.replace("tokens: [4096, 8192]", "tokens: [4096, 8192, 12288]"))
    logs.clear()
    rows = sweep(tmp_path / "g.yaml", data_dir, tmp_path / "study", log=logs.append, progress=False)
    trained = [line for line in logs if line.startswith("[")]
    assert len(rows) == 6 and len(trained) == 2 and all("D1.2e04" in line for line in trained)
    assert json.loads((tmp_path / "study" / "results.jsonl").read_text().splitlines()[-1])["tokens"] == 12288
    # A grid edited under the same run names (names keep 2 significant digits and no head count) is
    # refused, not taken as done: another head size, or 4,100 tokens (two more steps) for D4.1e03.
    for edit in (("head_size: 16", "head_size: 8"), ("tokens: [4096, 8192]", "tokens: [4100, 8192]")):
        (tmp_path / "g.yaml").write_text(GRID.replace(*edit))
        with pytest.raises(UserError, match=r"results.jsonl:\d: run L\d-d32-D4.1e03 was swept with (n_head 2 where the "
                                            r"grid now plans 4|tokens 4096 where the grid now plans 4224); the grid changed"):
            sweep(tmp_path / "g.yaml", data_dir, tmp_path / "study", log=logs.append, progress=False)
    # An interrupted run (a checkpoint, no row yet) would resume under the new schedule: refused, naming it.
    results = tmp_path / "study" / "results.jsonl"
    results.write_text("".join(results.read_text().splitlines(keepends=True)[1:]))
    with pytest.raises(UserError, match=r"runs/L2-d32-D4.1e03/step-\d+: run L2-d32-D4.1e03 was swept with tokens 4096"):
        sweep(tmp_path / "g.yaml", data_dir, tmp_path / "study", log=logs.append, progress=False)



def test_yaml_numbers_without_a_dot_are_numbers_in_train_and_model(tmp_path):
    """YAML 1.1 reads `lr: 3e-3` as a string: refused as "train.lr is '3e-3'", where --train.lr 3e-3 is a number."""
    (tmp_path / "g.yaml").write_text(GRID.replace("lr: 3.0e-3", "lr: 3e-3").replace("context_length: 32}", "context_length: 32, norm_eps: 1e-6}"))
    [run, *_] = plan_runs(load_grid(tmp_path / "g.yaml"))
    assert _train_config(load_grid(tmp_path / "g.yaml")).lr == 3e-3 and run.model.norm_eps == 1e-6


def test_an_encoder_grid_trains_with_the_masked_lm_objective(tmp_path, data_dir):
    grid = GRID.replace("sizes: [2.0e4, 5.0e4]", "sizes: [2.0e4]").replace("tokens: [4096, 8192]", "tokens: [4096]")
    (tmp_path / "g.yaml").write_text(grid.replace("model: {context_length: 32}", "model: {context_length: 32, arch: encoder}")
                                      + "objective: mlm\n")
    [row] = sweep(tmp_path / "g.yaml", data_dir, tmp_path / "study", log=lambda *a: None, progress=False)
    assert row["config"]["arch"] == "encoder" and row["params"] == flops(ModelConfig.from_dict(row["config"]), 0)["params"]
    state = json.loads(next((tmp_path / "study" / "runs" / row["name"]).glob("step-*/trainer_state.json")).read_text())
    assert state["objective"] == "mlm" and 0 < row["loss"] < 12

@pytest.mark.parametrize(
    "text, match",
    [
        ("sizes: [1e4]\n", "exactly one of `tokens`"),
        ("sizes: [1e4]\ntokens: [1e6]\nflops: [1e12]\n", "exactly one of `tokens`"),
        ("sizes: [10]\ntokens: [1e6]\nhead_size: 64\n", "no shape with head size 64"),
        ("sizes: [-5]\ntokens: [1e6]\n", "positive finite numbers"),
        # nan passed `v <= 0`, then failed as "cannot convert float NaN to integer".
        ("sizes: [.nan]\ntokens: [1e6]\n", "`sizes` must be a non-empty list of positive finite numbers, got [nan]"),
        ("sizes: [1e5]\ntokens: [.inf]\n", "`tokens` must be a non-empty list of positive finite numbers, got [inf]"),
        ("sizes: [1e5]\nflops: [.nan]\n", "`flops` must be a non-empty list of positive finite numbers"),
        ("sizes: [1e5]\ntokens: [1e6]\naspect_ratio: .nan\n", "`aspect_ratio` must be a finite number > 0, got nan"),
        ("sizes: [1e5]\ntokens: [1e6]\nmodel: {rope_theta: .nan}\n", "model.rope_theta must be a finite number, got nan"),
        ("sizes: [1e5]\ntokens: [1e6]\nwidth: 3\n", "unknown key"),
        ("sizes: [1e5\n", "not valid YAML"),
        ("sizes: [1e5]\ntokens: [1e6]\naspect_ratio: wide\n", "`aspect_ratio` must be a finite number > 0, got 'wide'"),
        ("sizes: [1e5]\ntokens: [1e6]\nhead_size: 0.5\n", "`head_size` must be a whole number > 0"),
        ("sizes: [1e5]\ntokens: [1e6]\nmodel: {context_length: long}\n", "model.context_length is 'long'; it must be int"),
        ("sizes: [1e5]\ntokens: [1e6]\nobjective: seq2seq\n", "`objective` must be one of ['causal', 'mlm', 'mlm+nsp'], got 'seq2seq'"),
        ("sizes: [1e5]\ntokens: [1e6]\nmodel: {arch: encoder}\n", "objective causal trains decoder models but model.arch is encoder; set `objective: mlm`"),
        ("sizes: [1e5]\ntokens: [1e6]\nobjective: mlm\nmodel: {arch: encoder-decoder}\n", "a sweep trains decoder (causal) and encoder (mlm, mlm+nsp) models"),
        # An int past float range: math.isfinite raised OverflowError on it.
        ("sizes: [1" + "0" * 400 + "]\ntokens: [1e6]\n", "`sizes` must be a non-empty list of positive finite numbers"),
        # A number where a list belongs was a TypeError traceback.
        ("sizes: 2.0e+4\ntokens: [1e6]\n", "`sizes` must be a non-empty list of positive finite numbers, got 20000.0"),
        ("sizes: [1e5]\nflops: 1e12\n", "`flops` must be a non-empty list of positive finite numbers"),
        # Budgets that print alike at 2 digits, or a repeat, named one run: the second "resumed" the first.
        ("sizes: [1e5]\ntokens: [2.0e+4, 2.049e+4]\n", "`tokens` values 20000 and 20490 both give run name L2-d64-D2e04 "
         "(names keep 2 significant digits); remove the repeat or space the values further apart"),
        ("sizes: [1e5]\ntokens: [2.0e+4, 3.0e+4, 2.0e+4]\n", "`tokens` values 20000 and 20000 both give run name"),
        ("sizes: [1e5]\nflops: [1.0e+12, 1.04e+12]\nmodel: {vocab_size: 512}\n", "`flops` values 1e+12 and 1.04e+12 both give run name"),
        # `model:` keys the sweep chooses, and presets: silently overwritten or taken as a label before.
        ("sizes: [1e5]\ntokens: [1e6]\nmodel: {n_head: 4}\n", "grid `model` sets n_head, which the sweep chooses for each size; "
         "remove it and set the grid's head_size or aspect_ratio instead"),
        ("sizes: [1e5]\ntokens: [1e6]\nmodel: {n_layer: 4, n_embd: 64}\n", "grid `model` sets n_layer, n_embd, which"),
        ("sizes: [1e5]\ntokens: [1e6]\nmodel: {preset: gpt5}\n", "grid `model`: unknown model preset 'gpt5'; choose one of ['bert-base'"),
        ("sizes: [1e5]\ntokens: [1e6]\nmodel: [1, 2]\n", "grid `model` must map ModelConfig fields to values, got [1, 2]"),
    ],
)
def test_bad_grids(tmp_path, text, match):
    (tmp_path / "g.yaml").write_text(text)
    with pytest.raises(UserError, match=re.escape(match)):
        plan_runs(load_grid(tmp_path / "g.yaml"))


def test_grid_file_that_is_not_yaml_text(tmp_path):
    (tmp_path / "binary.yaml").write_bytes(b"\x80\x81sizes")
    with pytest.raises(UserError, match="is not UTF-8 text"):
        load_grid(tmp_path / "binary.yaml")
    with pytest.raises(UserError, match="is a directory"):
        load_grid(tmp_path)


@pytest.mark.slow
def test_runs_spread_over_devices_give_the_same_results(tmp_path, data_dir):
    """Two worker processes (here both on the CPU) produce exactly the rows of a sequential sweep."""
    (tmp_path / "g.yaml").write_text(GRID)
    one = {r["name"]: r["loss"] for r in sweep(tmp_path / "g.yaml", data_dir, tmp_path / "seq", log=lambda *a: None, progress=False)}
    two = sweep(tmp_path / "g.yaml", data_dir, tmp_path / "par", log=lambda *a: None, devices=["cpu", "cpu"])
    assert {r["name"]: r["loss"] for r in two} == one
    assert len(read_runs(tmp_path / "par")) == 4


def test_two_sizes_that_give_the_same_shape_are_one_clear_error(tmp_path):
    from lmforge.scaling.sweep import load_grid, plan_runs

    grid = tmp_path / "g.yaml"
    grid.write_text("sizes: [2.0e+6, 2.1e+6]\ntokens: [1.0e+6]\naspect_ratio: 32\nhead_size: 64\n")
    with pytest.raises(UserError, match="both give 5 layers x 192 wide"):
        plan_runs(load_grid(grid))


ISO_GRID = GRID.replace("tokens: [4096, 8192]", "flops: [1.0e9, 2.0e9]")


def test_isoflop_runs_spend_their_budget_in_the_fits_units(tmp_path, data_dir):
    """Every run of a `flops:` profile has 6 N D = C, N the full parameter count the fits use, up to one step."""
    (tmp_path / "g.yaml").write_text(ISO_GRID)
    rows = sweep(tmp_path / "g.yaml", data_dir, tmp_path / "study", log=lambda *a: None, progress=False)
    assert len(rows) == 4
    tokens_per_step = 4 * 32  # batch_size x context_length
    for row in rows:
        n = flops(ModelConfig.from_dict(row["config"]), 0)["params"]
        assert row["params"] == n
        c = 6 * n * row["tokens"]
        assert row["flops"] == c
        assert row["budget"] <= c < row["budget"] + 6 * n * tokens_per_step  # D rounded up to whole steps
        assert c / row["budget"] - 1 < 0.06  # one step of the 4 x 32 model is 5% of C = 1e9
    profiles = isoflop_profiles(read_runs(tmp_path / "study"))
    assert [(budget, len(runs)) for budget, runs in profiles] == [(1e9, 2), (2e9, 2)]
    # The two sizes of a profile train different token counts: iso in C, not in D.
    assert len({r.tokens for r in profiles[0][1]}) == 2


def test_isoflop_budgets_need_the_vocabulary(tmp_path, data_dir):
    (tmp_path / "g.yaml").write_text(ISO_GRID)
    with pytest.raises(UserError, match="need the vocabulary size to count N"):
        plan_runs(load_grid(tmp_path / "g.yaml"))
    from_data = plan_runs(load_grid(tmp_path / "g.yaml"), data_dir)
    assert len(from_data) == 4 and {r.model.vocab_size for r in from_data} == {512}
    (tmp_path / "g.yaml").write_text(ISO_GRID.replace("context_length: 32", "context_length: 32, vocab_size: 512"))
    assert [r.tokens for r in plan_runs(load_grid(tmp_path / "g.yaml"))] == [r.tokens for r in from_data]


def test_a_budget_too_small_for_the_schedule_is_one_clear_error(tmp_path, data_dir):
    (tmp_path / "g.yaml").write_text(ISO_GRID.replace("flops: [1.0e9, 2.0e9]", "flops: [1.0e7]"))
    with pytest.raises(UserError, match=r"budget C=1e\+07 gives it .* tokens, fewer than evals=2 steps of 128 tokens"):
        sweep(tmp_path / "g.yaml", data_dir, tmp_path / "study", log=lambda *a: None, progress=False)
    assert not (tmp_path / "study" / "runs").exists()  # refused before anything trained


def test_a_sweep_interrupted_mid_run_resumes_from_its_checkpoint(tmp_path, data_dir, monkeypatch):
    """Ctrl-C right after a run's first checkpoint; started again, the sweep continues that run from it.

    The loop turns SIGINT into "stop after this step, save, raise", so the cut is deterministic: the
    first checkpoint is step 8 (ckpt_interval = 32 // 4), the interrupted attempt saves step 9.
    """
    grid = GRID.replace("sizes: [2.0e4, 5.0e4]", "sizes: [2.0e4]").replace("tokens: [4096, 8192]", "tokens: [4096]")
    (tmp_path / "g.yaml").write_text(grid)
    saved, save = [], checkpointing.Checkpointer.save

    def save_then_interrupt(self, step, *args, **kwargs):
        path = save(self, step, *args, **kwargs)
        saved.append(step)
        if len(saved) == 1:
            os.kill(os.getpid(), signal.SIGINT)  # as if the user pressed Ctrl-C now
        return path

    monkeypatch.setattr(checkpointing.Checkpointer, "save", save_then_interrupt)
    with pytest.raises(UserError, match=r"run L2-d32-D4.1e03 interrupted at step 9; .*start the same sweep again"):
        sweep(tmp_path / "g.yaml", data_dir, tmp_path / "study", log=lambda *a: None, progress=False)
    run_dir = tmp_path / "study" / "runs" / "L2-d32-D4.1e03"
    assert saved == [8, 9] and [p.name for p in find_checkpoints(run_dir)] == ["step-000009"]
    assert not (tmp_path / "study" / "results.jsonl").exists()
    first_attempt = json.loads((run_dir / SECONDS_FILE).read_text())["seconds"]
    assert first_attempt > 0

    saved.clear()
    monkeypatch.setattr(checkpointing.Checkpointer, "save", lambda self, step, *a, **k: saved.append(step) or save(self, step, *a, **k))
    rows = sweep(tmp_path / "g.yaml", data_dir, tmp_path / "study", log=lambda *a: None, progress=False)
    # Resumed, not restarted: no checkpoint at or before step 9 was written again.
    assert saved == [16, 24, 32]
    assert len(rows) == 1 and rows[0]["tokens"] == 4096 and rows[0]["seconds"] > first_attempt
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if m["kind"] == "val"] == [16, 32]  # one row per step, none repeated
    # The same weights as a run that was never interrupted (every batch is a function of its step).
    reference = sweep(tmp_path / "g.yaml", data_dir, tmp_path / "uninterrupted", log=lambda *a: None, progress=False)
    assert rows[0]["loss"] == reference[0]["loss"]


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"params":1e6,"tokens":1e8,"loss":3.0}\n',
         r"results.jsonl:1: this row has no 'name', so `lmforge scaling sweep` did not write it"),
        ('{"name": "L2-d32-D4.1e03", "params":1e6,"tokens":1e8,"loss":3.0\n',
         r"results.jsonl:1: not valid JSON .*; fix or delete that line"),
        ('\n{"name": "L2-d32-D4.1e03", "params":1e6,"tokens":-1e8,"loss":3.0}\n',
         r"results.jsonl:2: 'tokens' must be > 0"),
    ],
    ids=["no name", "malformed", "bad value"],
)
def test_an_existing_results_file_it_cannot_resume_from_is_one_clear_error(tmp_path, content, message):
    # Seen in review: KeyError 'name' and a raw JSONDecodeError. Refused before anything trains.
    (tmp_path / "g.yaml").write_text(GRID)
    (tmp_path / "study").mkdir()
    (tmp_path / "study" / "results.jsonl").write_text(content)
    with pytest.raises(UserError, match=message):
        sweep(tmp_path / "g.yaml", tmp_path / "no-data", tmp_path / "study", log=lambda *a: None, progress=False)
    assert not (tmp_path / "study" / "runs").exists()


def test_a_nan_in_the_grids_train_is_refused_before_any_run(tmp_path, data_dir):
    (tmp_path / "g.yaml").write_text(GRID.replace("lr: 3.0e-3", "lr: .nan"))
    with pytest.raises(UserError, match=r"train\.lr must be a finite number, got nan"):
        sweep(tmp_path / "g.yaml", data_dir, tmp_path / "study", log=lambda *a: None, progress=False)
    assert not (tmp_path / "study").exists()


@pytest.mark.parametrize("inside", [".", "runs", "study"])
def test_a_study_in_its_data_directory_is_refused_before_anything_is_written(tmp_path, data_dir, inside):
    """Seen in review: pretrain refused the first run, but only after the sweep had written
    DATA/runs/NAME/sweep-seconds.json, which then made `prepare --out DATA` refuse the directory."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(data_dir, data)
    before = sorted(p.relative_to(data) for p in data.rglob("*"))
    (tmp_path / "g.yaml").write_text(GRID)
    with pytest.raises(UserError, match=r"the data directory .* pass an --out outside it"):
        sweep(tmp_path / "g.yaml", data, data / inside, log=lambda *a: None, progress=False)
    assert sorted(p.relative_to(data) for p in data.rglob("*")) == before


def test_a_run_refused_before_it_starts_leaves_no_run_directory(tmp_path, data_dir, monkeypatch):
    """Data a run cannot train on (or a device missing) is found by pretrain; the stopwatch around it
    must not leave a runs/NAME/sweep-seconds.json behind for a run that never started."""
    (tmp_path / "g.yaml").write_text(GRID)
    import importlib

    sweep_module = importlib.import_module("lmforge.scaling.sweep")  # the package's `sweep` is the function

    def refuse(data, out, *args, **kwargs):
        raise UserError("refused before training")

    monkeypatch.setattr(sweep_module, "pretrain", refuse)
    with pytest.raises(UserError, match="refused before training"):
        sweep(tmp_path / "g.yaml", data_dir, tmp_path / "study", log=lambda *a: None, progress=False)
    # Only the sweep's settings (sweep.json, written before its first run) are left: no run directory.
    assert [p.name for p in (tmp_path / "study").iterdir()] == ["sweep.json"]
    with pytest.raises(UserError, match="not a prepared data directory"):
        sweep(tmp_path / "g.yaml", tmp_path / "no-data", tmp_path / "other", log=lambda *a: None, progress=False)
    assert not (tmp_path / "other").exists()


def test_a_sweep_whose_runs_failed_before_any_checkpoint_takes_new_settings(tmp_path, data_dir, monkeypatch):
    """Seen in review: a first run that diverged (a run directory holding metrics.jsonl, no checkpoint, no row)
    bound the study to its settings, so the retry with the lower lr that the error advised was refused."""
    import importlib

    sweep_module = importlib.import_module("lmforge.scaling.sweep")

    def diverge(data, out, *args, **kwargs):
        (Path(out)).mkdir(parents=True, exist_ok=True)
        (Path(out) / "metrics.jsonl").write_text('{"kind": "train", "step": 1, "loss": 9.0}\n')
        raise UserError("loss is nan at step 2; lower --train.lr or pass --train.skip_nonfinite true to skip such steps")

    monkeypatch.setattr(sweep_module, "pretrain", diverge)
    one = GRID.replace("sizes: [2.0e4, 5.0e4]", "sizes: [2.0e4]").replace("tokens: [4096, 8192]", "tokens: [4096]")
    (tmp_path / "g.yaml").write_text(one)
    with pytest.raises(UserError, match=r"^run L\d+-d\d+-D[\d.e+]+: loss is nan at step 2; lower the grid's train: \{lr\} "
                                        r"or pass the grid's train: \{skip_nonfinite\} true to skip such steps$"):
        sweep(tmp_path / "g.yaml", data_dir, tmp_path / "study", log=lambda *a: None, progress=False)
    (tmp_path / "g.yaml").write_text(one.replace("lr: 3.0e-3", "lr: 1.0e-3"))
    with pytest.raises(UserError, match="loss is nan"):  # the run is tried again, under the new lr
        sweep(tmp_path / "g.yaml", data_dir, tmp_path / "study", log=lambda *a: None, progress=False)
    assert json.loads((tmp_path / "study" / "sweep.json").read_text())["train"]["lr"] == 1e-3
    # The failed attempts' time is not the time of the run that trains next from scratch.
    [run_dir] = (tmp_path / "study" / "runs").iterdir()
    (run_dir / SECONDS_FILE).write_text('{"seconds": 1000.0}\n')
    monkeypatch.undo()
    [row] = sweep(tmp_path / "g.yaml", data_dir, tmp_path / "study", log=lambda *a: None, progress=False)
    assert row["seconds"] < 1000


@pytest.mark.parametrize(
    "aspect, head, target, shape",
    [
        # Seen in review: the width rounded first, then the depth, gave 3 x 64 (1.47x), 1 x 128 (1.97x), or
        # nothing (1 x 64 is 0.49x) where 2 x 64 holds 0.98x.
        (24, 16, 1e5, (2, 64)),
        (128, 64, 1e5, (2, 64)),
        (64, 64, 1e5, (2, 64)),
        # Shapes the old rule put within 12.5% of their target stay as they were, so that sweeps begun
        # under it resume: the CPU study's (bench/grids/cpu-study.yaml) 2 x 48, 4 x 96 and 5 x 112.
        (24, 16, 5e4, (2, 48)),
        (24, 16, 4e5, (4, 96)),
        (24, 16, 8e5, (5, 112)),
    ],
)
def test_shapes_land_near_their_target(tmp_path, aspect, head, target, shape):
    (tmp_path / "g.yaml").write_text(f"sizes: [{target:e}]\ntokens: [1.0e+6]\naspect_ratio: {aspect}\nhead_size: {head}\n")
    cfg = shape_for(target, load_grid(tmp_path / "g.yaml"))
    assert (cfg.n_layer, cfg.n_embd) == shape and cfg.head_size == head


def test_a_size_no_shape_comes_near_names_the_nearest(tmp_path):
    (tmp_path / "g.yaml").write_text("sizes: [10]\ntokens: [1.0e+6]\nhead_size: 64\n")
    with pytest.raises(UserError, match=re.escape("no shape with head size 64 and aspect ratio 32 has about 10 block "
                                                  "parameters (nearest: 1 layers x 64 wide = 4.92e+04)")):
        plan_runs(load_grid(tmp_path / "g.yaml"))


def test_a_preset_gives_the_architecture_and_the_sweep_the_shape(tmp_path):
    """Seen in review: `preset` was kept as a label only, so smollm2-135m swept GELU models with learned positions."""
    (tmp_path / "g.yaml").write_text(GRID.replace("model: {context_length: 32}", "model: {preset: smollm2-135m, context_length: 32}"))
    cfg = shape_for(2e4, load_grid(tmp_path / "g.yaml"))
    assert (cfg.position, cfg.norm, cfg.mlp, cfg.bias, cfg.rope_theta) == ("rotary", "rmsnorm", "swiglu", False, 1e5)
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.context_length, cfg.preset) == (2, 32, 2, 32, "smollm2-135m")
    # The preset's own sizing (an MLP 1536 wide, 3 key/value heads for its 9) would not fit a 32-wide model.
    assert (cfg.mlp_hidden, cfg.n_kv_head) == (None, None)


def test_a_val_split_too_small_to_score_a_run_is_refused_before_any_run(tmp_path, corpus_file, tokenizer_dir):
    """Seen in review: found only after the first run had trained."""
    from lmforge.data import prepare

    prepare([corpus_file], tokenizer_dir, tmp_path / "data", val_fraction=0.0, progress=False)
    (tmp_path / "g.yaml").write_text(GRID)
    with pytest.raises(UserError, match=r"data holds 0 validation tokens, no more than one window of seq_len 32, so no run "
                                        r"could be scored; prepare it with a larger --val-fraction"):
        sweep(tmp_path / "g.yaml", tmp_path / "data", tmp_path / "study", log=lambda *a: None, progress=False)
    assert not (tmp_path / "study").exists()


def test_a_train_value_of_the_wrong_type_names_the_field(tmp_path, data_dir):
    """Seen in review: "grid 'train': '<' not supported between instances of 'str' and 'int'"."""
    (tmp_path / "g.yaml").write_text(GRID.replace("batch_size: 4", 'batch_size: "8"'))
    with pytest.raises(UserError, match=r"^train\.batch_size is '8'; it must be int$"):
        sweep(tmp_path / "g.yaml", data_dir, tmp_path / "study", log=lambda *a: None, progress=False)


def test_a_sweep_refuses_other_data_or_settings_than_its_runs_had(tmp_path, data_dir):
    """Seen in review: a sweep into a copy of a study, on other data, appended its rows beside the first
    study's; editing the grid's `train:` and sweeping again was as silent."""
    import shutil

    one = GRID.replace("sizes: [2.0e4, 5.0e4]", "sizes: [2.0e4]").replace("tokens: [4096, 8192]", "tokens: [4096]")
    (tmp_path / "g.yaml").write_text(one)
    [row] = sweep(tmp_path / "g.yaml", data_dir, tmp_path / "study", log=lambda *a: None, progress=False)
    settings = json.loads((tmp_path / "study" / "sweep.json").read_text())
    assert row["sweep"] == settings and settings["train"]["lr"] == 3e-3 and settings["model"]["context_length"] == 32
    meta = json.loads((data_dir / "meta.json").read_text())
    assert settings["data"] == {"tokenizer_sha256": meta["tokenizer_sha256"], "train_tokens": meta["splits"]["train"]["tokens"],
                                "val_tokens": meta["splits"]["val"]["tokens"]}
    before = (tmp_path / "study" / "results.jsonl").read_text()

    other = tmp_path / "other-data"  # another tokenizer: refused before anything trains, so its shards may stay
    shutil.copytree(data_dir, other)
    (other / "meta.json").write_text(json.dumps({**meta, "tokenizer_sha256": "0" * 64}))
    more = one.replace("tokens: [4096]", "tokens: [4096, 8192]")
    (tmp_path / "g.yaml").write_text(more)
    with pytest.raises(UserError, match=r"study holds runs swept with other data or settings \(\S+results.jsonl:1: "
                                        r"data.tokenizer_sha256: '\w{14}\.\.\. vs '0{14}\.\.\.\); sweep into another --out"):
        sweep(tmp_path / "g.yaml", other, tmp_path / "study", log=lambda *a: None, progress=False)
    (tmp_path / "g.yaml").write_text(more.replace("lr: 3.0e-3", "lr: 1.0e-3").replace("batch_size: 4", "batch_size: 2"))
    with pytest.raises(UserError, match=r"results.jsonl:1: train.batch_size: 4 vs 2, train.lr: 0.003 vs 0.001\); sweep into another --out"):
        sweep(tmp_path / "g.yaml", data_dir, tmp_path / "study", log=lambda *a: None, progress=False)
    assert (tmp_path / "study" / "results.jsonl").read_text() == before
    assert [p.name for p in (tmp_path / "study" / "runs").iterdir()] == [row["name"]]

    # An interrupted first run (a checkpoint, no row yet) is guarded by sweep.json alone.
    (tmp_path / "study" / "results.jsonl").unlink()
    with pytest.raises(UserError, match=r"sweep.json: train.batch_size: 4 vs 2"):
        sweep(tmp_path / "g.yaml", data_dir, tmp_path / "study", log=lambda *a: None, progress=False)


def test_a_sweep_from_before_settings_were_recorded_still_resumes_and_fits(tmp_path, data_dir):
    (tmp_path / "g.yaml").write_text(GRID.replace("tokens: [4096, 8192]", "tokens: [4096]"))
    rows = sweep(tmp_path / "g.yaml", data_dir, tmp_path / "study", log=lambda *a: None, progress=False)
    results = tmp_path / "study" / "results.jsonl"
    results.write_text("".join(json.dumps({k: v for k, v in row.items() if k != "sweep"}) + "\n" for row in rows))
    (tmp_path / "study" / "sweep.json").unlink()
    (tmp_path / "g.yaml").write_text(GRID.replace("lr: 3.0e-3", "lr: 2.0e-3"))  # unknowable from such rows
    logs = []
    rows = sweep(tmp_path / "g.yaml", data_dir, tmp_path / "study", log=logs.append, progress=False)
    assert len(rows) == 4 and len(logs) == 2 and [("sweep" in row) for row in rows] == [False, False, True, True]
    assert len(read_runs(tmp_path / "study")) == 4
    assert json.loads((tmp_path / "study" / "sweep.json").read_text())["train"]["lr"] == 2e-3


def test_a_failing_run_on_several_devices_drops_the_queue_and_keeps_the_rows_in_progress(tmp_path, data_dir, monkeypatch):
    """Seen in review: with `--devices A B` a failed run was told of only after every queued run had trained,
    and none of their rows were written. Threads stand in for the worker processes, and a stand-in for
    training decides which run fails; the sweep's handling of the workers is the real one."""
    import importlib
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    sweep_module = importlib.import_module("lmforge.scaling.sweep")
    monkeypatch.setattr(sweep_module, "_DEVICE", None)  # the workers' initializer sets it: restored after the test
    monkeypatch.setattr(sweep_module, "ProcessPoolExecutor",
                        lambda n, mp_context, initializer, initargs: ThreadPoolExecutor(n, initializer=initializer, initargs=initargs))
    (tmp_path / "g.yaml").write_text(GRID.replace("tokens: [4096, 8192]", "tokens: [4096, 8192, 12288]"))
    planned = [run.name for run in plan_runs(load_grid(tmp_path / "g.yaml"))]
    started, second_started = [], threading.Event()

    def train_one(run, *args):
        started.append(run.name)
        if run.name == planned[0]:
            second_started.wait(5)
            raise UserError(f"run {run.name} failed")
        second_started.set()
        time.sleep(0.5)  # still training when the first run fails
        return {"name": run.name, "params": 1000, "tokens": run.tokens, "loss": 3.0, "seconds": 0.5,
                "config": {"n_layer": run.model.n_layer, "n_embd": run.model.n_embd}}

    monkeypatch.setattr(sweep_module, "_train_one", train_one)
    logs = []
    with pytest.raises(UserError, match=rf"run {planned[0]} failed"):
        sweep(tmp_path / "g.yaml", data_dir, tmp_path / "study", log=logs.append, devices=["cpu", "cpu"])
    assert len(planned) == 6 and set(started) <= set(planned[:3])  # the worker freed by the failure may take one more
    assert logs[0] == f"[1/6] failed: run {planned[0]} failed" and logs[1].startswith("dropping the queued runs; finishing the ")
    rows = [json.loads(line)["name"] for line in (tmp_path / "study" / "results.jsonl").read_text().splitlines()]
    assert sorted(rows) == sorted(started[1:]) and planned[1] in rows
