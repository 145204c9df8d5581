import json
import os
import re
import signal

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
from lmforge.scaling.sweep import SECONDS_FILE
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
    # 2e4: n_embd = (2e4 * 16 / 12)^(1/3) = 29.9 -> 32 (whole heads), n_layer = 32 / 16 = 2.
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
    grid.write_text("sizes: [2.0e+6, 4.0e+6]\ntokens: [1.0e+6]\naspect_ratio: 32\nhead_size: 64\n")
    with pytest.raises(UserError, match="both give 6 layers x 192 wide"):
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
        assert c / row["budget"] - 1 < 0.03
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
    assert not (tmp_path / "study").exists()
    with pytest.raises(UserError, match="not a prepared data directory"):
        sweep(tmp_path / "g.yaml", tmp_path / "no-data", tmp_path / "study", log=lambda *a: None, progress=False)
    assert not (tmp_path / "study").exists()
