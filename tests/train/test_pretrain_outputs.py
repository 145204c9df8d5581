"""Where a training run may write: not into a checkpoint, not into prepared data, not to an empty path."""

import shutil

import pytest

from conftest import tiny_train_config
from lmforge.train import pretrain
from lmforge.utils.errors import UserError

quiet = dict(progress=False, log=lambda *a: None)


def _files(path):
    return sorted(p.name for p in path.iterdir())


@pytest.mark.parametrize("where", ["checkpoint", "inside checkpoint", "other data"])
def test_a_run_inside_a_checkpoint_or_a_data_directory_is_refused(where, trained_run, data_dir, tmp_path):
    ckpt = tmp_path / "run" / trained_run.checkpoint.name
    shutil.copytree(trained_run.checkpoint, ckpt)
    other = tmp_path / "data2"
    shutil.copytree(data_dir, other)
    out = {"checkpoint": ckpt, "inside checkpoint": ckpt / "again", "other data": other / "run"}[where]
    before = {p: _files(p) for p in (ckpt, other)}
    metrics = (ckpt / "metrics.jsonl").read_bytes()
    with pytest.raises(UserError, match="pass an --out outside it") as err:
        pretrain(data_dir, out, "tiny", tiny_train_config(max_steps=2), **quiet)
    assert "\n" not in str(err.value)
    assert {p: _files(p) for p in (ckpt, other)} == before and (ckpt / "metrics.jsonl").read_bytes() == metrics


def test_an_empty_out_is_refused_before_training(data_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="empty") as err:
        pretrain(data_dir, "", "tiny", tiny_train_config(max_steps=2), **quiet)
    assert "\n" not in str(err.value) and _files(tmp_path) == []
