"""The encoder-decoder Transformer: it learns to reverse sequences, and lowers its loss on Multi30k."""

import gzip
import json
import math
import random

import pytest
import torch

from conftest import SHARED_DATA, tiny_train_config
from lmforge.config import ModelConfig, preset
from lmforge.data import prepare_parallel, train_tokenizer
from lmforge.infer import SamplingConfig, generate_tokens, load
from lmforge.model import Transformer
from lmforge.train import pretrain
from lmforge.utils.errors import UserError

quiet = dict(progress=False, log=lambda *a: None)
TINY = ModelConfig(arch="encoder-decoder", context_length=32, n_layer=2, n_encoder_layer=2, n_head=4, n_embd=64)


def test_cached_generation_equals_uncached():
    torch.manual_seed(0)
    model = Transformer(TINY.replace(vocab_size=60)).eval()
    src = torch.randint(5, 60, (1, 9))
    with torch.no_grad():
        memory = model.encode_source(src)
    greedy = SamplingConfig(temperature=0)
    cached = list(generate_tokens(model, [3], 20, greedy, memory=memory))
    assert cached == list(generate_tokens(model, [3], 20, greedy, use_cache=False, memory=memory))


@pytest.mark.slow
def test_learns_to_reverse_sequences(tmp_path):
    rng = random.Random(0)
    pairs = []
    for _ in range(3000):
        seq = [rng.choice("abcdefgh") for _ in range(rng.randint(3, 6))]
        pairs.append((" ".join(seq), " ".join(reversed(seq))))
    (tmp_path / "src.txt").write_text("".join(s + "\n" for s, _ in pairs))
    (tmp_path / "tgt.txt").write_text("".join(t + "\n" for _, t in pairs))
    train_tokenizer([tmp_path / "src.txt", tmp_path / "tgt.txt"], 270, tmp_path / "tok")
    prepare_parallel(tmp_path / "src.txt", tmp_path / "tgt.txt", tmp_path / "tok", tmp_path / "data", val_fraction=0.05)
    cfg = tiny_train_config(max_steps=400, batch_size=32, lr=2e-3, min_lr=2e-4, warmup_steps=40, eval_interval=200, ckpt_interval=400)
    run = pretrain(tmp_path / "data", tmp_path / "run", TINY, cfg, objective="seq2seq", **quiet)
    lm = load(run.out, device="cpu")
    held_out = pairs[-50:]  # the validation pairs, never trained on
    exact = sum(lm.generate(s, 12, temperature=0) == t for s, t in held_out)
    assert exact >= 40, f"{exact}/50 reversed exactly"


@pytest.mark.slow
def test_lowers_its_loss_on_multi30k(tmp_path):
    root = SHARED_DATA / "translation" / "multi30k-en-de"
    for lang in ("en", "de"):
        with gzip.open(root / f"train.{lang}.gz", "rt", encoding="utf-8") as f:
            (tmp_path / f"train.{lang}").write_text("".join(next(f) for _ in range(3000)))
    train_tokenizer([tmp_path / "train.en", tmp_path / "train.de"], 1000, tmp_path / "tok")
    prepare_parallel(tmp_path / "train.en", tmp_path / "train.de", tmp_path / "tok", tmp_path / "data", val_fraction=0.05)
    cfg = tiny_train_config(max_steps=150, batch_size=32, lr=3e-3, min_lr=3e-4, eval_interval=50, ckpt_interval=150)
    run = pretrain(tmp_path / "data", tmp_path / "run", TINY.replace(context_length=64), cfg, objective="seq2seq", **quiet)
    val = [r["val_loss"] for r in map(json.loads, (run.out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "val"]
    assert val[-1] < val[0] - 0.3 and val[-1] < math.log(1000) - 2.0


def test_objective_and_data_must_match(tmp_path, data_dir):
    with pytest.raises(UserError, match="seq2seq trains on parallel data"):
        pretrain(data_dir, tmp_path / "r", TINY, tiny_train_config(), objective="seq2seq", **quiet)
    with pytest.raises(UserError, match="trains encoder-decoder models"):
        pretrain(data_dir, tmp_path / "r", "tiny", tiny_train_config(), objective="seq2seq", **quiet)
    assert preset("transformer-base", vocab_size=100).arch == "encoder-decoder"


def test_cli_prepare_train_translate_and_refusals(tmp_path, capsys):
    from lmforge.cli.main import main

    (tmp_path / "s.txt").write_text("".join(f"{w} {w}\n" for w in ("red", "blue", "green", "black", "white") * 40))
    (tmp_path / "t.txt").write_text("".join(f"{w}\n" for w in ("rot", "blau", "grun", "schwarz", "weiss") * 40))
    assert main(["tokenizer", "train", str(tmp_path / "s.txt"), str(tmp_path / "t.txt"), "--vocab-size", "300",
                 "--out", str(tmp_path / "tok")]) == 0
    assert main(["prepare", str(tmp_path / "s.txt"), "--target", str(tmp_path / "t.txt"), "--tokenizer",
                 str(tmp_path / "tok"), "--out", str(tmp_path / "data"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["splits"]["val"]["pairs"] == 20
    assert main(["pretrain", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "run"), "--objective", "seq2seq",
                 "--model.arch", "encoder-decoder", "--model.n_layer", "1", "--model.n_embd", "32", "--model.n_head", "2",
                 "--model.context_length", "16", "--train.max_steps", "60", "--train.batch_size", "16", "--train.lr", "3e-3",
                 "--train.device", "cpu", "--train.tensorboard", "false"]) == 0
    capsys.readouterr()
    assert main(["generate", str(tmp_path / "run"), "--prompt", "blue blue", "--temperature", "0", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.strip() == "blau"
    assert main(["export", "hf", str(tmp_path / "run"), "--out", str(tmp_path / "hf")]) == 2
    assert main(["eval", str(tmp_path / "run"), "--data", str(tmp_path / "s.txt")]) == 2
    assert "no Hugging Face equivalent" in (err := capsys.readouterr().err) and "eval measures next-token" in err
