"""Where a training run (pretrain, finetune) may write: not into a checkpoint, not into prepared data, not to an empty path."""

import re
import shutil

import pytest

from conftest import tiny_train_config
from lmforge.train import pretrain
from lmforge.utils.errors import UserError

quiet = dict(progress=False, log=lambda *a: None)


def _files(path):
    return sorted(p.name for p in path.iterdir())


def _finetune(ckpt, out):
    from conftest import SHARED_DATA
    from lmforge.finetune import finetune

    yelp = SHARED_DATA / "classification" / "uci-sentiment" / "yelp_labelled.txt"
    finetune(ckpt, "classify", yelp, out, train=tiny_train_config(max_steps=2, eval_interval=0, seq_len=32, batch_size=4),
             **quiet)


@pytest.mark.parametrize("verb", ["pretrain", "finetune"])
@pytest.mark.parametrize("where", ["checkpoint", "inside checkpoint", "data"])
def test_a_run_inside_a_checkpoint_or_a_data_directory_is_refused(verb, where, trained_run, data_dir, tmp_path):
    """Both verbs check their --out with `check_run_out` before any work, and leave both folders as they were."""
    ckpt = tmp_path / "run" / trained_run.checkpoint.name
    shutil.copytree(trained_run.checkpoint, ckpt)
    data = tmp_path / "data2"
    shutil.copytree(data_dir, data)
    out = {"checkpoint": ckpt, "inside checkpoint": ckpt / "again", "data": data}[where]
    before = {p: _files(p) for p in (ckpt, data)}
    metrics = (ckpt / "metrics.jsonl").read_bytes()
    with pytest.raises(UserError, match="pass an --out outside it") as err:
        if verb == "pretrain":
            pretrain(data_dir, out, "tiny", tiny_train_config(max_steps=2), **quiet)
        else:
            _finetune(ckpt, out)
    assert "\n" not in str(err.value) and re.search("checkpoint|data directory", str(err.value))
    assert {p: _files(p) for p in (ckpt, data)} == before and (ckpt / "metrics.jsonl").read_bytes() == metrics


def test_an_empty_out_is_refused_before_training(data_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="empty") as err:
        pretrain(data_dir, "", "tiny", tiny_train_config(max_steps=2), **quiet)
    assert "\n" not in str(err.value) and _files(tmp_path) == []
