"""Where fine-tuning, merge-lora and predict may write: never over their own inputs or a run's state."""

import json
import re
import shutil

import pytest

from conftest import SHARED_DATA, tiny_train_config
from lmforge.checkpoint import find_checkpoints
from lmforge.config import LoraConfig
from lmforge.finetune import finetune, merge_lora
from lmforge.infer import predict
from lmforge.utils.errors import UserError

YELP = SHARED_DATA / "classification" / "uci-sentiment" / "yelp_labelled.txt"
QUIET = dict(progress=False, log=lambda *a: None)


def _cfg(**overrides):
    return tiny_train_config(**{"max_steps": 2, "eval_interval": 0, "ckpt_interval": 0, "seq_len": 32, "batch_size": 4,
                                **overrides})


@pytest.fixture(scope="module")
def lora_run(trained_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "lora"
    return finetune(trained_run.out, "classify", YELP, out, train=_cfg(), lora=LoraConfig(r=4), **QUIET)


def _files(path):
    return sorted(p.name for p in path.iterdir())


def test_merge_lora_never_writes_over_its_source_or_a_training_checkpoint(lora_run, tmp_path):
    run = tmp_path / "lora"
    shutil.copytree(lora_run.out, run)
    step = run / lora_run.checkpoint.name
    before = _files(step)
    for out, says in ((step, "is the source"), (run, "holds the source"), (step / "merged", "is inside the source")):
        with pytest.raises(UserError, match=says) as err:
            merge_lora(run, out)
        assert "\n" not in str(err.value)
    assert _files(step) == before and "optimizer.safetensors" in before
    other = tmp_path / "other"
    shutil.copytree(step, other)  # a training checkpoint that is not the source
    with pytest.raises(UserError, match="optimizer.safetensors.*pass a new --out"):
        merge_lora(run, other)
    merged = merge_lora(run, tmp_path / "merged")
    assert merge_lora(run, merged) == merged  # an earlier merge is replaced


def test_finetune_resumed_with_other_lora_settings_names_the_flags(lora_run, trained_run, tmp_path):
    out = tmp_path / "lora"
    shutil.copytree(lora_run.out, out)
    with pytest.raises(UserError) as err:
        finetune(trained_run.out, "classify", YELP, out, train=_cfg(max_steps=4), lora=LoraConfig(r=8, alpha=32.0),
                 resume=True, **QUIET)
    message = str(err.value)
    assert "--lora.r 8 (saved: 4)" in message and "--lora.alpha 32.0 (saved: 16.0)" in message, message
    assert "--model" not in message and "\n" not in message


def test_finetune_resumed_with_another_input_layout_names_the_flags(trained_run, tmp_path):
    """eval and predict lay inputs out as the checkpoint's trainer state says: a run resumed with
    another layout would record it for weights that learned the saved one."""
    data = tmp_path / "tags.conll"
    data.write_text("Peter\tB-PER\nlives\tO\nin\tO\nBerlin\tB-LOC\n\nAnna\tB-PER\nsings\tO\n")
    out = tmp_path / "tag"
    finetune(trained_run.out, "tag", data, out, train=_cfg(), **QUIET)
    with pytest.raises(UserError) as err:
        finetune(trained_run.out, "tag", data, out, train=_cfg(max_steps=4), repeat_input=True, resume=True, **QUIET)
    message = str(err.value)
    assert "--repeat-input (saved: off)" in message and message.endswith("(without --repeat-input)"), message
    # Options tag would ignore are refused before anything is compared or recorded.
    for option, says in (({"prompt": "Tag: {source}"}, "--prompt formats a decoder's seq2seq input; --task tag on this "
                                                       "decoder does not use it: drop it"),
                         ({"doc_stride": 64}, "--doc-stride is the overlap of qa's windows over a long context; tag does "
                                              "not use it: drop it")):
        with pytest.raises(UserError, match=re.escape(says)):
            finetune(trained_run.out, "tag", data, out, train=_cfg(max_steps=4), resume=True, **option, **QUIET)
    assert [p.name for p in find_checkpoints(out)] == ["step-000002"]
    assert finetune(trained_run.out, "tag", data, out, train=_cfg(max_steps=4), resume=True, **QUIET).checkpoint.name == "step-000004"


@pytest.fixture(scope="module")
def clf_run(trained_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("clf") / "clf"
    return finetune(trained_run.out, "classify", YELP, out, train=_cfg(), **QUIET)


def test_predict_never_writes_over_its_input_or_a_file_that_is_not_predictions(clf_run, tmp_path):
    dev = tmp_path / "dev.tsv"
    dev.write_text("a fine meal\t1\nawful\t0\n")
    data = dev.read_text()
    with pytest.raises(UserError, match="is the --data file") as err:
        predict(clf_run.checkpoint, dev, dev, device="cpu")
    assert "\n" not in str(err.value) and dev.read_text() == data
    weights = tmp_path / "model.safetensors"
    shutil.copyfile(clf_run.checkpoint / "model.safetensors", weights)
    notes = tmp_path / "notes.jsonl"
    notes.write_text('{"text": "mine"}\n')
    for target in (weights, notes):
        kept = target.read_bytes()
        with pytest.raises(UserError, match="exists and is not an earlier predictions file"):
            predict(clf_run.checkpoint, dev, target, device="cpu")
        assert target.read_bytes() == kept
    out = tmp_path / "pred.jsonl"
    assert predict(clf_run.checkpoint, dev, out, device="cpu") == 2
    assert predict(clf_run.checkpoint, dev, out, device="cpu") == 2  # earlier predictions are replaced
    assert json.loads(out.read_text().splitlines()[0])["where"].endswith("dev.tsv:1")
    empty = tmp_path / "empty.jsonl"
    empty.touch()
    assert predict(clf_run.checkpoint, dev, empty, device="cpu") == 2


def test_finetune_resumed_with_other_frozen_parameters_names_the_flags(trained_run, tmp_path):
    """Seen in review: a run resumed without its --freeze-* flags was refused for its optimizer state,
    with advice to keep the --train settings, which were the same."""
    data = tmp_path / "tags.conll"
    data.write_text("Peter\tB-PER\nlives\tO\nin\tO\nBerlin\tB-LOC\n\nAnna\tB-PER\nsings\tO\n")
    out = tmp_path / "tag"
    finetune(trained_run.out, "tag", data, out, train=_cfg(), freeze_embeddings=True, freeze_layers=1, **QUIET)
    with pytest.raises(UserError) as err:
        finetune(trained_run.out, "tag", data, out, train=_cfg(max_steps=4), resume=True, **QUIET)
    message = str(err.value)
    assert "without --freeze-embeddings (saved: on); --freeze-layers 0 (saved: 1)" in message, message
    assert message.endswith("(--freeze-embeddings, --freeze-layers 1)") and "--train" not in message, message
    resumed = finetune(trained_run.out, "tag", data, out, train=_cfg(max_steps=4), freeze_embeddings=True, freeze_layers=1,
                       resume=True, **QUIET)
    assert resumed.checkpoint.name == "step-000004"
