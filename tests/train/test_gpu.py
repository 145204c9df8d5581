"""The CUDA path: bf16 autocast, fused AdamW and torch.compile. Skipped without a GPU."""

import pytest
import torch

from conftest import tiny_train_config, train_losses
from lmforge.infer import SamplingConfig, generate_tokens, load
from lmforge.train import pretrain

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("compile,mode", [(False, "default"), (True, "default"), (True, "reduce-overhead")])
def test_cuda_bf16_run_learns_and_generates(data_dir, tmp_path, compile, mode):
    cfg = tiny_train_config(device="cuda", dtype="auto", compile=compile, compile_mode=mode)
    run = pretrain(data_dir, tmp_path / "run", "tiny", cfg, progress=False, log=lambda *a: None)
    assert run.val_loss is not None and run.val_loss < 5.3
    lm = load(run.out, device="cuda", dtype="float32")  # exact: bf16 rounding could flip a near-tie between the two paths
    greedy = SamplingConfig(temperature=0)
    prompt = lm.tokenizer.encode("ROMEO:")
    assert list(generate_tokens(lm.model, prompt, 40, greedy)) == list(generate_tokens(lm.model, prompt, 40, greedy, use_cache=False))
    bf16 = load(run.out, device="cuda")  # auto: bf16 weights and KV cache on CUDA
    assert bf16.model.output.weight.dtype == torch.bfloat16 and len(list(generate_tokens(bf16.model, prompt, 40, greedy))) == 40


def test_cuda_muon_speedrun_run_with_chunked_loss_learns(data_dir, tmp_path):
    """Muon's Newton-Schulz in bf16, the speedrun blocks and the chunked loss under bf16 autocast, compiled."""
    from lmforge.config import preset
    from lmforge.config.presets import SPEEDRUN

    cfg = tiny_train_config(device="cuda", dtype="auto", compile=True, optim="muon", chunked_loss=100)
    run = pretrain(data_dir, tmp_path / "run", preset("tiny", **SPEEDRUN), cfg, progress=False, log=lambda *a: None)
    assert run.val_loss is not None and run.val_loss < 4.8


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9), reason="needs FP8 tensor cores")
def test_cuda_fp8_compiled_run_tracks_bf16(data_dir, tmp_path):
    pytest.importorskip("torchao.float8")
    cfg = tiny_train_config(device="cuda", dtype="auto", compile=True, max_steps=30, eval_interval=0, ckpt_interval=0, log_interval=1)
    runs = [pretrain(data_dir, tmp_path / str(fp8), "tiny", cfg.replace(fp8=fp8), progress=False, log=lambda *a: None)
            for fp8 in (False, True)]
    bf16, fp8 = (train_losses(run.out) for run in runs)
    assert len(fp8) == 30 and abs(sum(fp8) - sum(bf16)) / sum(bf16) < 0.01


def test_cuda_chunked_loss_matches_plain_under_bf16():
    from lmforge.model.losses import chunked_lm_loss, lm_loss

    torch.manual_seed(0)
    h = torch.randn(4, 256, 64, device="cuda")
    w = torch.randn(1000, 64, device="cuda", requires_grad=True)
    y = torch.randint(0, 1000, (4, 256), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        plain = lm_loss(torch.nn.functional.linear(h, w), y)
        chunked = chunked_lm_loss(h, w, y, 300)
    (g_plain,) = torch.autograd.grad(plain, w)
    (g_chunked,) = torch.autograd.grad(chunked, w)
    assert abs(plain.item() - chunked.item()) < 1e-2 * plain.item()
    torch.testing.assert_close(g_chunked, g_plain, atol=2e-3, rtol=5e-2)
