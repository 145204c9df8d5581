"""The main job end to end, shortened to a few steps (the full recipe is what `make demo` runs)."""

import json

import pytest

from lmforge.cli.main import main


@pytest.mark.slow
def test_demo_runs_end_to_end_and_reports_json(capsys, tmp_path):
    assert main(["demo", "--out", str(tmp_path / "demo"), "--max-steps", "3", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert set(result) >= {"val_loss", "val_bpb", "seconds", "sample"}
    assert result["sample"].startswith("ROMEO:") and len(result["sample"]) > 50
    assert 0 < result["val_bpb"] < 5 and (tmp_path / "demo" / "run" / "loss.png").exists()


def test_demo_with_zero_steps_is_an_error_not_the_full_recipe(capsys, tmp_path):
    assert main(["demo", "--out", str(tmp_path / "demo"), "--max-steps", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "lmforge: error: train.max_steps must be >= 1, got 0" and not (tmp_path / "demo").exists()
