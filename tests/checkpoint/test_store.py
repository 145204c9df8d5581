import json

import pytest
import torch

from lmforge.checkpoint import load_model, resolve_checkpoint, save_checkpoint
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
