"""SIGTERM (`kill`, a scheduler, `timeout`) ends a verb as Ctrl-C does: cleaned up, in one line."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from lmforge.cli import commands
from lmforge.cli.main import main

SRC = Path(__file__).resolve().parents[2] / "src"

# The process sends itself SIGTERM where a `kill` would land: prepare in the middle of tokenizing,
# pretrain at the start of its fourth step.
_TERMINATED = """
import os, signal, sys
from lmforge.tokenizer import Tokenizer
import lmforge.train.loop as loop

def encode_batch(self, texts, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)
    return [[] for _ in texts]

lr_at = loop.lr_at

def lr_then_terminated(step, train):
    if step == 3:
        os.kill(os.getpid(), signal.SIGTERM)
    return lr_at(step, train)

Tokenizer.encode_batch = encode_batch
loop.lr_at = lr_then_terminated
from lmforge.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


def _run(*argv):
    return subprocess.run([sys.executable, "-c", _TERMINATED, *map(str, argv)], capture_output=True, text=True,
                          check=False, timeout=300, env={**os.environ, "PYTHONPATH": str(SRC)})


@pytest.mark.slow
def test_sigterm_stops_prepare_as_ctrl_c_does_and_leaves_no_temporary_folder(tmp_path, corpus_file, tokenizer_dir):
    """The default action of SIGTERM ended the process on the spot: a hidden `.out.*.tmp` with the
    shards written so far stayed behind. Now the earlier output stays as it was, and nothing else."""
    out = tmp_path / "data"
    out.mkdir()
    proc = _run("prepare", corpus_file, "--tokenizer", tokenizer_dir, "--out", out)
    assert proc.returncode == 130, proc.stderr[-2000:]
    assert proc.stderr.splitlines()[-1] == "lmforge: interrupted" and "Traceback" not in proc.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["data"] and list(out.iterdir()) == []


@pytest.mark.slow
def test_pretrain_still_stops_after_the_current_step_on_sigterm(tmp_path, data_dir):
    """pretrain's own handler takes SIGTERM while it trains (the CLI's does not pre-empt it): the run
    stops after the step and saves a checkpoint to resume from."""
    proc = _run("pretrain", "--data", data_dir, "--out", tmp_path / "run", "--model.preset", "tiny",
                "--model.n_layer", 1, "--train.max_steps", 50, "--train.batch_size", 2, "--train.eval_interval", 0,
                "--train.device", "cpu", "--train.tensorboard", "false")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "interrupted at step 4; checkpoint saved to" in proc.stderr.splitlines()[-1]
    assert (tmp_path / "run" / "step-000004").is_dir()


def test_main_puts_sigterm_back_and_keeps_a_handler_of_the_program_that_runs_it(monkeypatch):
    seen = []
    monkeypatch.setitem(commands.HANDLERS, "prepare", lambda args: seen.append(signal.getsignal(signal.SIGTERM)))
    argv = ["prepare", "corpus.txt", "--tokenizer", "tok", "--out", "data"]
    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        assert main(argv) == 0
        assert callable(seen[-1]) and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL

        def own(signum, frame):
            pass

        signal.signal(signal.SIGTERM, own)
        assert main(argv) == 0
        assert seen[-1] is own and signal.getsignal(signal.SIGTERM) is own
    finally:
        signal.signal(signal.SIGTERM, previous)
