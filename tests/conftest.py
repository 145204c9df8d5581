"""Shared fixtures: a small real corpus, its tokenizer and shards, and a briefly trained checkpoint.

Everything is built once per session from a 120 KB slice of tinyshakespeare, on the CPU.
"""

from __future__ import annotations

import os
from pathlib import Path

# Scaling fits run L-BFGS-B thousands of times on 5 variables; OpenBLAS waking its thread pool for
# such tiny calls makes each fit 10-30x slower on a busy core. Read when scipy loads: set it first.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = ROOT / "src" / "lmforge" / "assets" / "tinyshakespeare.txt"
SHARED_DATA = ROOT.parent / "shared" / "data"

# Tiny models gain nothing from a second thread, and OpenMP threads that spin-wait on a busy
# core slow a step down a hundredfold: the suite runs single-threaded.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _restore_torch_state():
    """Tests may change the default dtype, thread count or RNG; put them back afterwards."""
    dtype, threads, rng = torch.get_default_dtype(), torch.get_num_threads(), torch.get_rng_state()
    yield
    torch.set_default_dtype(dtype)
    torch.set_num_threads(threads)
    torch.set_rng_state(rng)


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "shakespeare-120k.txt"
    path.write_text(SHAKESPEARE.read_text(encoding="utf-8")[:120_000], encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tokenizer_dir(corpus_file, tmp_path_factory) -> Path:
    from lmforge.data import train_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer([corpus_file], 512, out)
    return out


@pytest.fixture(scope="session")
def data_dir(corpus_file, tokenizer_dir, tmp_path_factory) -> Path:
    from lmforge.data import prepare

    out = tmp_path_factory.mktemp("data") / "shards"
    prepare([corpus_file], tokenizer_dir, out, val_fraction=0.1, progress=False)
    return out


def train_losses(run_dir: Path) -> list[float]:
    """The training losses a run logged to its metrics.jsonl, in order."""
    import json

    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["kind"] == "train"]


def torchrun(*args: str) -> tuple[list[str], dict[str, str]]:
    """The command and environment of `torchrun --standalone --nproc-per-node 2 ARGS` on the CPU
    (gloo), one thread per process, running this checkout's lmforge."""
    import sys

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
    return cmd, {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}


def run_torchrun(*args: str):
    """Run `torchrun(*args)` to completion; it must succeed. The CompletedProcess, text captured."""
    import subprocess

    cmd, env = torchrun(*args)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def tiny_train_config(**overrides):
    from lmforge.config import TrainConfig

    base = dict(
        max_steps=60, batch_size=8, lr=1e-2, min_lr=1e-3, warmup_steps=5, eval_interval=20, eval_batches=4,
        log_interval=10, ckpt_interval=20, device="cpu", compile=False, tensorboard=False, seed=7, threads=1,
    )
    return TrainConfig(**{**base, **overrides})


@pytest.fixture(scope="session")
def trained_run(data_dir, tmp_path_factory):
    """A tiny model trained for 60 steps (about a second)."""
    from lmforge.train import pretrain

    out = tmp_path_factory.mktemp("runs") / "tiny"
    return pretrain(data_dir, out, "tiny", tiny_train_config(), progress=False, log=lambda *a: None)


def varied_transformer(seed: int = 0, **overrides):
    """A tiny random decoder whose greedy output varies (GPT-2's small init mostly repeats the last token)."""
    from lmforge.config import preset
    from lmforge.model import Transformer

    torch.manual_seed(seed)
    model = Transformer(preset("tiny", **{"vocab_size": 100, "context_length": 64, "tie_embeddings": False, **overrides}))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.3)
    return model.eval()


@pytest.fixture(scope="module")
def varied_model():
    return varied_transformer()


def bench_module(name: str, monkeypatch):
    """bench/NAME.py imported as `python bench/NAME.py` runs it (bench/ on the path, for its `_stop`)."""
    import importlib.util

    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bench_rows(module, monkeypatch, capsys, *argv: str) -> list[dict]:
    """The JSON rows a bench module's main() prints for `argv`."""
    import json
    import sys

    monkeypatch.setattr(sys, "argv", [module.__file__, *argv])
    module.main()
    return [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
