"""train.fp8: torchao's float8 linears in the blocks, run on the CPU through torch's reference kernels."""

import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_train_config, train_losses
from lmforge.checkpoint import load_model
from lmforge.config import preset
from lmforge.model import Transformer
from lmforge.train import pretrain
from lmforge.train.float8 import to_float8
from lmforge.utils.errors import UserError

pytest.importorskip("torchao.float8")
quiet = dict(progress=False, log=lambda *a: None)


def test_only_the_blocks_linears_become_float8():
    from torchao.float8.float8_linear import Float8Linear

    net = Transformer(preset("tiny", vocab_size=512))
    names = to_float8(net, torch.device("cpu"))
    assert names == [f"layers.{i}.{part}" for i in range(2)
                     for part in ("attention.qkv", "attention.proj", "feed_forward.fc", "feed_forward.proj")]
    assert {n for n, m in net.named_modules() if isinstance(m, Float8Linear)} == set(names)
    assert type(net.output) is torch.nn.Linear and net.output.weight is net.tok_embeddings.weight  # tied head stays
    assert all(p.dtype == torch.float32 for p in net.parameters())  # weights keep their dtype


def test_float8_run_tracks_the_fp32_loss_and_writes_a_plain_checkpoint(data_dir, tmp_path):
    """The issue's check at this scale: the mean training loss within 1% of the same run without fp8."""
    cfg = tiny_train_config(max_steps=30, eval_interval=0, ckpt_interval=0, log_interval=1)
    plain = pretrain(data_dir, tmp_path / "plain", "tiny", cfg, **quiet)
    fp8 = pretrain(data_dir, tmp_path / "fp8", "tiny", cfg.replace(fp8=True), **quiet)
    ours, theirs = train_losses(fp8.out), train_losses(plain.out)
    assert len(ours) == len(theirs) == 30
    assert ours != theirs  # the float8 casts did run
    mean_ours, mean_theirs = sum(ours) / 30, sum(theirs) / 30
    assert abs(mean_ours - mean_theirs) / mean_theirs < 0.01
    assert ours[-1] < ours[0] - 1.0
    # Same keys and dtypes as a plain run: the checkpoint loads as a plain model.
    weights, reference = load_file(fp8.checkpoint / "model.safetensors"), load_file(plain.checkpoint / "model.safetensors")
    assert {k: v.dtype for k, v in weights.items()} == {k: v.dtype for k, v in reference.items()}
    model, _ = load_model(fp8.checkpoint)
    assert all(type(m) is torch.nn.Linear for m in model.modules() if isinstance(m, torch.nn.Linear))


def test_float8_refuses_what_it_cannot_do(monkeypatch):
    odd = Transformer(preset("tiny", vocab_size=512, n_embd=40, n_head=4))
    with pytest.raises(UserError, match="divisible by 16"):
        to_float8(odd, torch.device("cpu"))
    monkeypatch.setitem(sys.modules, "torchao.float8", None)  # as if torchao were not installed
    with pytest.raises(UserError, match="pip install torchao"):
        to_float8(Transformer(preset("tiny", vocab_size=512)), torch.device("cpu"))
