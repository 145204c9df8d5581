import json

import pytest

from lmforge.scaling import load_grid, plan_runs, read_runs, shape_for, sweep
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
    assert row["params"] > row["params_no_embed"] == 12 * 2 * 32 * 32
    # A longer grid: only the new runs train.
    (tmp_path / "g.yaml").write_text(GRID.replace("tokens: [4096, 8192]", "tokens: [4096, 8192, 12288]"))
    logs.clear()
    rows = sweep(tmp_path / "g.yaml", data_dir, tmp_path / "study", log=logs.append, progress=False)
    trained = [line for line in logs if line.startswith("[")]
    assert len(rows) == 6 and len(trained) == 2 and all("D1.2e04" in line for line in trained)
    assert json.loads((tmp_path / "study" / "results.jsonl").read_text().splitlines()[-1])["tokens"] == 12288


@pytest.mark.parametrize(
    "text, match",
    [
        ("sizes: [1e4]\n", "exactly one of `tokens`"),
        ("sizes: [1e4]\ntokens: [1e6]\nflops: [1e12]\n", "exactly one of `tokens`"),
        ("sizes: [10]\ntokens: [1e6]\nhead_size: 64\n", "no shape with head size 64"),
        ("sizes: [-5]\ntokens: [1e6]\n", "positive numbers"),
        ("sizes: [1e5]\ntokens: [1e6]\nwidth: 3\n", "unknown key"),
        ("sizes: [1e5\n", "not valid YAML"),
    ],
)
def test_bad_grids(tmp_path, text, match):
    (tmp_path / "g.yaml").write_text(text)
    with pytest.raises(UserError, match=match):
        plan_runs(load_grid(tmp_path / "g.yaml"))


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
