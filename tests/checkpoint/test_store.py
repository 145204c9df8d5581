import json
import os
import re
import shutil
import stat

import pytest
import torch

from lmforge.checkpoint import find_checkpoints, load_model, resolve_checkpoint, save_checkpoint
from lmforge.checkpoint.store import incomplete_steps
from lmforge.config import preset
from lmforge.model import Transformer
from lmforge.tokenizer import Tokenizer
from lmforge.utils.errors import UserError


@pytest.fixture
def saved(tokenizer_dir, tmp_path):
    tok = Tokenizer.load(tokenizer_dir)
    torch.manual_seed(0)
    model = Transformer(preset("tiny", vocab_size=tok.vocab_size, tie_embeddings=True))
    return model, save_checkpoint(tmp_path / "ckpt", model, tok)


def test_round_trip_gives_identical_logits(saved):
    model, path = saved
    loaded, ckpt = load_model(path)
    idx = torch.randint(0, 500, (2, 16))
    torch.testing.assert_close(loaded(idx), model.eval()(idx), rtol=0, atol=0)
    assert ckpt.model_config == model.config
    assert loaded.output.weight is loaded.tok_embeddings.weight  # still tied after loading


def test_run_directory_resolves_to_latest_step(trained_run):
    assert resolve_checkpoint(trained_run.out) == trained_run.checkpoint


def test_missing_checkpoint(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no checkpoint"):
        load_model(tmp_path / "empty")


def test_corrupt_weights(saved):
    _, path = saved
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="corrupt"):
        load_model(path)


def test_corrupt_config(saved):
    _, path = saved
    (path / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="corrupt"):
        load_model(path)
    (path / "config.json").write_text(json.dumps({"format": 1, "model": {"n_layers": 2}}))
    with pytest.raises(UserError, match="unknown model config key"):
        load_model(path)


def test_config_that_disagrees_with_weights(saved):
    _, path = saved
    cfg = json.loads((path / "config.json").read_text())
    cfg["model"]["n_layer"] = 3
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="does not match config.json"):
        load_model(path)


def test_failed_save_leaves_nothing(tmp_path, tokenizer_dir):
    class Boom(Tokenizer):
        def save(self, directory):
            raise RuntimeError("disk full")

    tok = Tokenizer.load(tokenizer_dir)
    model = Transformer(preset("tiny", vocab_size=tok.vocab_size))
    with pytest.raises(RuntimeError):
        save_checkpoint(tmp_path / "ckpt", model, Boom(tok.hf))
    assert list(tmp_path.iterdir()) == []


def test_config_with_other_shapes_than_the_weights(saved):
    _, path = saved
    cfg = json.loads((path / "config.json").read_text())
    cfg["model"]["n_embd"] *= 2  # every tensor's shape differs: not "corrupt", inconsistent
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match=r"does not match config.json \(size mismatch for .*, and \d+ more\)"):
        load_model(path)


def test_config_with_values_of_the_wrong_type(saved):
    _, path = saved
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "model": {**cfg["model"], "n_head": "four"}}))
    with pytest.raises(UserError, match="model.n_head is 'four'; it must be int"):
        load_model(path)
    (path / "config.json").write_text(json.dumps({**cfg, "model": [1, 2]}))
    with pytest.raises(UserError, match="must map field names to values, got a list"):
        load_model(path)


def test_checkpoint_without_its_tokenizer(saved):
    _, path = saved
    (path / "tokenizer.json").unlink()
    with pytest.raises(UserError, match="tokenizer.json is missing; the checkpoint is incomplete"):
        load_model(path)


def test_save_refuses_to_replace_what_is_not_a_checkpoint(saved, tmp_path):
    model, path = saved
    tok = Tokenizer.load(path)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    (tmp_path / "file").write_text("keep me too")
    for target in (tmp_path / "notes", tmp_path / "file"):
        with pytest.raises(UserError, match="exists and is not a checkpoint directory"):
            save_checkpoint(target, model, tok)
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me" and (tmp_path / "file").read_text() == "keep me too"
    save_checkpoint(path, model, tok)  # an earlier checkpoint is replaced, as before


def test_a_hugging_face_directory_says_to_import_it_first(tmp_path):
    """`lmforge export hf` (or generate, eval) of a Hugging Face directory said its config.json was not an
    lmforge checkpoint config and to re-export it."""
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    with pytest.raises(UserError, match=r"hf is a Hugging Face model directory, not an lmforge checkpoint; .*"
                                        r"`lmforge import hf .*hf --out CKPT`") as err:
        load_model(tmp_path / "hf")
    assert "\n" not in str(err.value) and "re-export" not in str(err.value)


# ------------------------------------------------------------- what a checkpoint must hold to be read
def test_a_tokenizer_larger_than_the_models_vocabulary_is_refused_naming_both_sizes(tokenizer_dir, tmp_path):
    """Seen in review: the wrong tokenizer.json copied into a checkpoint (as the missing-tokenizer error
    advises copying one) gave an IndexError traceback in generate, eval and lmforge.load."""
    tok = Tokenizer.load(tokenizer_dir)
    path = save_checkpoint(tmp_path / "ckpt", Transformer(preset("tiny", vocab_size=300)), tok)
    with pytest.raises(UserError, match=r"ckpt/tokenizer.json has 512 tokens but the model's vocab_size is 300 "
                                        r"\(.*config.json\); .*the tokenizer the weights were trained with") as err:
        load_model(path)
    assert "\n" not in str(err.value)


def test_a_config_without_vocab_size_names_the_file_not_a_flag(saved):
    """Seen in review: generate said `pass --model.vocab_size`, a flag it does not have."""
    _, path = saved
    cfg = json.loads((path / "config.json").read_text())
    del cfg["model"]["vocab_size"]
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match=r"ckpt/config.json sets no model.vocab_size") as err:
        load_model(path)
    assert "--model" not in str(err.value)


def test_an_unknown_config_key_names_the_file_and_a_newer_lmforge(saved):
    _, path = saved
    cfg = json.loads((path / "config.json").read_text())
    cfg["model"]["sliding_window"] = 4096
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match=r"ckpt/config.json: unknown model config key\(s\) \['sliding_window'\] "
                                        r"\(written by a newer lmforge\?"):
        load_model(path)


def test_inference_does_not_read_a_damaged_trainer_state(saved):
    """Seen in review: a damaged trainer_state.json blocked generate, export and serve, which never use it."""
    model, path = saved
    (path / "trainer_state.json").write_text("{not json")
    loaded, ckpt = load_model(path)
    assert loaded.config == model.config
    with pytest.raises(UserError, match=r"trainer_state.json is corrupt"):  # what needs it still refuses it
        ckpt.trainer_state


def test_weights_and_optimizer_state_get_the_usual_file_mode(tokenizer_dir, tmp_path):
    """Seen in review: safetensors 0.8 writes 0600, so another account (a server) could not read the weights."""
    tok = Tokenizer.load(tokenizer_dir)
    model = Transformer(preset("tiny", vocab_size=tok.vocab_size))
    old = os.umask(0o022)
    try:
        path = save_checkpoint(tmp_path / "ckpt", model, tok, trainer_state={"step": 1},
                               optimizer_state={"state": {0: {"exp_avg": torch.zeros(2)}}, "param_groups": []})
    finally:
        os.umask(old)
    modes = {f.name: stat.S_IMODE(f.stat().st_mode) for f in path.iterdir()}
    assert modes["model.safetensors"] == modes["optimizer.safetensors"] == modes["config.json"] == 0o644, modes


# ------------------------------------------------------------- the latest complete step of a run
def _run_with(saved, tmp_path, *steps):
    """A run directory holding the saved checkpoint as step-000006 and, for each (name, files) in
    `steps`, a step directory holding only those files of it (a copy in progress)."""
    _, path = saved
    run = tmp_path / "run"
    run.mkdir()
    shutil.copytree(path, run / "step-000006")
    for name, files in steps:
        (run / name).mkdir()
        for f in files:
            shutil.copyfile(path / f, run / name / f)
    return run


@pytest.mark.parametrize("files", [["config.json"], ["config.json", "model.safetensors"], ["model.safetensors", "tokenizer.json"]])
def test_a_step_directory_that_is_being_copied_is_not_the_latest_checkpoint(saved, tmp_path, files):
    """Seen in review: a step-000010 holding only config.json (rsync and cp write it first) was taken for
    the latest checkpoint, and generate failed on its missing tokenizer.json instead of using step 6."""
    run = _run_with(saved, tmp_path, ("step-000010", files))
    assert find_checkpoints(run) == [run / "step-000006"]
    assert resolve_checkpoint(run) == run / "step-000006"
    assert incomplete_steps(run) == [run / "step-000010"]


def test_a_run_holding_only_a_partial_step_says_so(saved, tmp_path):
    """Seen in review: it said `no config.json and no step-* directories`, which was false."""
    run = _run_with(saved, tmp_path, ("step-000002", ["config.json"]))
    shutil.rmtree(run / "step-000006")
    with pytest.raises(UserError, match=r"run holds no complete checkpoint: step-000002 lacks model.safetensors, "
                                        r"tokenizer.json") as err:
        load_model(run)
    assert "no step-* directories" not in str(err.value)


def test_the_latest_step_is_the_highest_number_not_the_last_name(saved, tmp_path):
    """step-1000000 sorts before step-999999 by name: the run resolves to step 1000000."""
    _, path = saved
    run = tmp_path / "run"
    for name in ("step-1000000", "step-999999"):
        shutil.copytree(path, run / name)
    assert find_checkpoints(run) == [run / "step-999999", run / "step-1000000"]
    assert resolve_checkpoint(run) == run / "step-1000000"
    model, _ = saved
    with pytest.raises(UserError, match=r"it holds step-1000000\)"):  # a save over the run names its latest step
        save_checkpoint(run, model, None)


# ------------------------------------------------------------- the tokenizer against the model's vocabulary
@pytest.mark.parametrize("vocab_size", [512, 513, 640])
def test_a_model_vocabulary_as_large_as_or_larger_than_the_tokenizer_loads(vocab_size, tokenizer_dir, tmp_path):
    """The tokenizer has 512 tokens: a vocab_size of exactly 512, or one padded above it, has a row for each."""
    tok = Tokenizer.load(tokenizer_dir)
    assert tok.vocab_size == 512
    model = Transformer(preset("tiny", vocab_size=vocab_size))
    loaded, ckpt = load_model(save_checkpoint(tmp_path / "ckpt", model, tok))
    assert ckpt.model_config.vocab_size == vocab_size and ckpt.tokenizer.vocab_size == 512


def test_a_model_vocabulary_one_short_of_the_tokenizer_is_refused(tokenizer_dir, tmp_path):
    """vocab_size 511 is padded to 512 embedding rows, but row 511 is padding, not a token's (export drops it)."""
    tok = Tokenizer.load(tokenizer_dir)
    model = Transformer(preset("tiny", vocab_size=511))
    assert model.config.padded_vocab_size == 512
    path = save_checkpoint(tmp_path / "ckpt", model, tok)
    with pytest.raises(UserError, match=r"ckpt/tokenizer.json has 512 tokens but the model's vocab_size is 511 "):
        load_model(path)


# ------------------------------------------------------------- what a save may replace
def test_a_save_without_a_step_never_replaces_a_training_checkpoint(saved, tmp_path):
    """A trainer_state without a step (merge-lora's) is no run re-saving its own step: over a checkpoint
    whose trainer_state.json has a step, the save is refused and the training checkpoint kept."""
    model, earlier = saved
    tok = Tokenizer.load(earlier)
    path = save_checkpoint(tmp_path / "train", model, tok, trainer_state={"step": 3})
    with pytest.raises(UserError, match=r"train is a training checkpoint or run \(it holds trainer_state.json\), "
                                        r"which replacing it with a checkpoint directory would lose; pass a new --out"):
        save_checkpoint(path, model, tok, trainer_state={"task": None, "merged_from": "x"})
    assert json.loads((path / "trainer_state.json").read_text()) == {"step": 3}
    save_checkpoint(path, model, tok, trainer_state={"step": 4})  # the run re-saving a step of its own
    assert json.loads((path / "trainer_state.json").read_text()) == {"step": 4}


# ------------------------------------------------------------- weights and config that do not match
def test_weights_with_an_extra_or_a_missing_tensor_are_refused_naming_it(saved):
    from safetensors.torch import load_file, save_file

    _, path = saved
    tensors = load_file(path / "model.safetensors")
    save_file({**tensors, "layers.9.extra.weight": torch.zeros(2)}, str(path / "model.safetensors"))
    with pytest.raises(UserError, match=re.escape("does not match config.json (missing [], unexpected "
                                                  "['layers.9.extra.weight'])")) as err:
        load_model(path)
    assert "\n" not in str(err.value)
    gone = "norm.weight"
    assert gone in tensors
    save_file({k: v for k, v in tensors.items() if k != gone}, str(path / "model.safetensors"))
    with pytest.raises(UserError, match=re.escape(f"does not match config.json (missing ['{gone}'], unexpected [])")):
        load_model(path)


@pytest.mark.parametrize("config", [{"model_type": "llama"}, {"architectures": ["LlamaForCausalLM"]}])
def test_a_hugging_face_config_naming_only_one_of_its_keys_says_to_import_it(config, tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "vocab_size": 512}))
    with pytest.raises(UserError, match=r"hf is a Hugging Face model directory, not an lmforge checkpoint; .*"
                                        r"`lmforge import hf .*hf --out CKPT`"):
        load_model(tmp_path / "hf")


@pytest.mark.parametrize("fmt", [2, 0, "1", None])
def test_a_config_of_another_format_is_refused(fmt, saved):
    _, path = saved
    cfg = json.loads((path / "config.json").read_text())
    if fmt is None:
        del cfg["format"]
    else:
        cfg["format"] = fmt
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match=r"ckpt/config.json is not an lmforge checkpoint config \(format 1\); re-export it"):
        load_model(path)
