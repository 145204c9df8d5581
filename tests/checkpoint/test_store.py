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
