"""The CUDA path: bf16 autocast, fused AdamW and torch.compile. Skipped without a GPU."""

import pytest
import torch

from conftest import tiny_train_config
from lmforge.infer import SamplingConfig, generate_tokens, load
from lmforge.train import pretrain

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("compile", [False, True])
def test_cuda_bf16_run_learns_and_generates(data_dir, tmp_path, compile):
    cfg = tiny_train_config(device="cuda", dtype="auto", compile=compile)
    run = pretrain(data_dir, tmp_path / "run", "tiny", cfg, progress=False, log=lambda *a: None)
    assert run.val_loss is not None and run.val_loss < 5.3
    lm = load(run.out, device="cuda")
    greedy = SamplingConfig(temperature=0)
    prompt = lm.tokenizer.encode("ROMEO:")
    assert list(generate_tokens(lm.model, prompt, 40, greedy)) == list(generate_tokens(lm.model, prompt, 40, greedy, use_cache=False))
