"""The main job end to end, shortened to a few steps (the full recipe is what `make demo` runs)."""

import json

import pytest

from lmforge.checkpoint.store import CKPT_FILES
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


def test_demo_refuses_to_delete_a_run_folder_it_did_not_write(capsys, tmp_path):
    (tmp_path / "demo" / "run").mkdir(parents=True)
    (tmp_path / "demo" / "run" / "notes.txt").write_text("keep me")
    assert main(["demo", "--out", str(tmp_path / "demo"), "--max-steps", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "run exists and is not an earlier demo's run" in err[0]
    assert (tmp_path / "demo" / "run" / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in (tmp_path / "demo").iterdir()) == ["run"]  # no tokenizer trained first


@pytest.mark.parametrize("earlier", [["metrics.jsonl"], [f"step-000003/{name}" for name in CKPT_FILES], ["tensorboard/events.out"]])
def test_demo_starts_an_earlier_demo_run_again(capsys, tmp_path, monkeypatch, earlier):
    import lmforge.cli.demo as demo
    from lmforge.utils.errors import UserError

    def stop(*args, **kwargs):
        raise UserError("stopped after the cleanup")

    monkeypatch.setattr(demo, "train_tokenizer", stop)
    for name in earlier:
        (tmp_path / "demo" / "run" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "demo" / "run" / name).write_text("{}")
    assert main(["demo", "--out", str(tmp_path / "demo"), "--max-steps", "3"]) == 2
    assert "stopped after the cleanup" in capsys.readouterr().err and not (tmp_path / "demo" / "run").exists()


def test_demo_refuses_data_or_tokenizer_folders_of_the_user_before_any_work(capsys, tmp_path):
    (tmp_path / "demo" / "data").mkdir(parents=True)
    (tmp_path / "demo" / "data" / "notes.txt").write_text("keep me")
    assert main(["demo", "--out", str(tmp_path / "demo"), "--max-steps", "3"]) == 2
    assert "data exists and is not a prepared data directory" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "demo").iterdir()) == ["data"]


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_demo_on_cuda_without_a_gpu_fails_first_and_names_its_own_option(capsys, tmp_path):
    assert main(["demo", "--out", str(tmp_path / "demo"), "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--device cpu" in err[0] and "--train.device" not in err[0], err
    assert not (tmp_path / "demo").exists()


def test_an_interrupted_demo_says_how_to_resume_it_and_resumes(capsys, tmp_path, monkeypatch):
    """Seen in review: Ctrl-C advised `--resume`, which demo did not take; running it again threw the checkpoint away."""
    import os
    import signal

    import lmforge.train.loop as loop

    out = tmp_path / "demo"
    lr_at = loop.lr_at

    def interrupt_in_step_3(step, cfg):
        if step == 2:  # Ctrl-C during the third step (lr_at counts from 0): the run stops when it is done
            os.kill(os.getpid(), signal.SIGINT)
        return lr_at(step, cfg)

    monkeypatch.setattr(loop, "lr_at", interrupt_in_step_3)
    assert main(["demo", "--out", str(out), "--max-steps", "5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"lmforge: error: demo interrupted at step 3; checkpoint saved to {out / 'run' / 'step-000003'}; "
                       f"continue with `lmforge demo --resume --out {out}`")
    monkeypatch.setattr(loop, "lr_at", lr_at)
    assert main(["demo", "--out", str(out), "--max-steps", "5", "--resume", "--json"]) == 0
    printed = capsys.readouterr()
    assert "kept from the stopped demo" in printed.err + printed.out
    assert json.loads(printed.out.strip().splitlines()[-1])["checkpoint"].endswith("step-000005")


def test_resuming_a_demo_that_never_ran_is_one_line(capsys, tmp_path):
    assert main(["demo", "--out", str(tmp_path / "demo"), "--resume"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith("holds no stopped demo to resume "
                                                                     f"(no checkpoint in {tmp_path / 'demo' / 'run'}); run `lmforge demo`")
