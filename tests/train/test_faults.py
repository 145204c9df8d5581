"""Faults: a non-finite loss stops the run (or skips the step) without losing work, and a process
killed while it writes a checkpoint resumes from the last complete one."""

import errno
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, tiny_train_config, torchrun
from lmforge.checkpoint import find_checkpoints, load_checkpoint, load_model
from lmforge.checkpoint.store import load_optimizer_state
from lmforge.config import preset
from lmforge.data import load_meta
from lmforge.model import Transformer
from lmforge.tokenizer import Tokenizer
from lmforge.train import fit
from lmforge.train.objectives import Objective
from lmforge.utils.errors import UserError


class Poisoned(Objective):
    """The causal objective, whose loss turns nan (or inf) at the given 0-based steps (or (step, micro) pairs);
    with `gradient_only`, the loss stays finite and only its gradient turns nan."""

    def __init__(self, *args, bad_steps=(), value=math.nan, gradient_only=False, **kwargs):
        super().__init__(*args, **kwargs)
        self.bad_steps, self.value, self.gradient_only = set(bad_steps), value, gradient_only

    def batch(self, windows, batch_size, step, micro=0, seed=None):
        poison = step in self.bad_steps or (step, micro) in self.bad_steps
        return {**super().batch(windows, batch_size, step, micro, seed), "poison": torch.tensor(poison)}

    def loss(self, model, batch):
        loss = super().loss(model, batch)
        poisoned = loss * torch.where(batch["poison"], self.value, 1.0)  # not where(p, loss * nan, loss): its gradient is nan
        if self.gradient_only:  # the value of `loss`, the gradient of `poisoned` too (0 x nan: nan)
            return torch.where(torch.tensor(True), loss, poisoned)
        return poisoned


def run(data_dir, out, bad_steps, value=math.nan, gradient_only=False, **train):
    tok = Tokenizer.load(data_dir)
    cfg = preset("tiny", vocab_size=load_meta(data_dir)["vocab_size"])
    torch.manual_seed(0)
    task = Poisoned("causal", cfg, tok, 7, bad_steps=bad_steps, value=value, gradient_only=gradient_only)
    cfg_train = tiny_train_config(**{"max_steps": 8, "ckpt_interval": 2, "eval_interval": 0, "log_interval": 1, "keep_checkpoints": 5, **train})
    return fit(Transformer(cfg), task, tok, cfg_train, out, task.open(data_dir, "train", 64), tokens_per_sample=64,
               progress=False, log=lambda *a: None)


@pytest.mark.parametrize("value,word", [(math.nan, "nan"), (math.inf, "inf")])
def test_nonfinite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(data_dir, tmp_path, value, word):
    out = tmp_path / "run"
    with pytest.raises(UserError) as e:
        run(data_dir, out, bad_steps={4}, value=value)  # the 5th step, as metrics.jsonl counts
    message = str(e.value)
    assert message.startswith(f"loss is {word} at step 5; lower --train.lr or pass --train.skip_nonfinite true")
    assert str(out / "step-000004") in message
    assert [p.name for p in find_checkpoints(out)] == ["step-000002", "step-000004"]
    weights = load_file(str(out / "step-000004" / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values())
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]


def test_deferred_check_stops_before_the_next_checkpoint(data_dir, tmp_path, monkeypatch):
    """The CUDA schedule (no sync per step): a bad step between checks is caught before anything is saved."""
    import lmforge.train.loop as loop

    monkeypatch.setattr(loop, "_check_every_step", lambda device, train: False)
    out = tmp_path / "run"
    with pytest.raises(UserError, match=r"^loss is not finite \(nan or inf\) at step 3; .* last good checkpoint is .*step-000002$"):
        run(data_dir, out, bad_steps={2}, log_interval=2)
    assert [p.name for p in find_checkpoints(out)] == ["step-000002"]


@pytest.mark.parametrize("skip", [False, True])
def test_a_nan_gradient_under_a_finite_loss_is_caught_without_clipping(data_dir, tmp_path, skip):
    """Seen in review: with --train.grad_clip 0 the norm was never taken, and nan weights reached a checkpoint."""
    out = tmp_path / "run"
    bad = {"bad_steps": {2}, "gradient_only": True, "grad_clip": 0.0, "ckpt_interval": 1}
    if skip:
        result = run(data_dir, out, **bad, skip_nonfinite=True)
        assert result.step == 8 and result.skipped_steps == 1
        rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows if r["kind"] == "skipped"] == [3]
        assert all(math.isfinite(r["grad_norm"]) for r in rows if r["kind"] == "train")
    else:
        with pytest.raises(UserError, match=r"^loss is \d+\.\d+ but its gradient norm is not finite at step 3; .*step-000002$"):
            run(data_dir, out, **bad)
    for ckpt in find_checkpoints(out):
        weights = load_file(str(ckpt / "model.safetensors"))
        assert all(torch.isfinite(t).all() for t in weights.values()), ckpt.name


def test_skip_nonfinite_drops_the_step_and_trains_on(data_dir, tmp_path):
    result = run(data_dir, tmp_path / "run", bad_steps={2, 5}, skip_nonfinite=True)
    assert result.step == 8 and result.skipped_steps == 2 and math.isfinite(result.train_loss)
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "skipped"] == [3, 6]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2, 4, 5, 7, 8]
    model, _ = load_model(result.checkpoint)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert 0 < result.data_wait_share < 1


def test_a_skipped_step_leaves_weights_and_optimizer_alone(data_dir, tmp_path):
    out = tmp_path / "run"
    run(data_dir, out, bad_steps={7}, skip_nonfinite=True, ckpt_interval=1)
    before, after = load_file(str(out / "step-000007" / "model.safetensors")), load_file(str(out / "step-000008" / "model.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert load_file(str(out / "step-000007" / "optimizer.safetensors")).keys() == load_file(str(out / "step-000008" / "optimizer.safetensors")).keys()


@pytest.mark.slow
def test_kill_during_a_checkpoint_write_resumes_from_the_last_complete_one(data_dir, tmp_path):
    """SIGKILL `lmforge pretrain` while a checkpoint is half written; resume gives the uninterrupted weights."""
    args = [
        "--data", str(data_dir), "--model.preset", "tiny", "--train.max_steps", "20", "--train.batch_size", "4",
        "--train.keep_checkpoints", "2", "--train.eval_interval", "0",
        "--train.device", "cpu", "--train.tensorboard", "false", "--train.seed", "3", "--train.threads", "1",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "lmforge", "pretrain"]
    victim = tmp_path / "killed"
    every_step = ["--train.ckpt_interval", "1"]
    proc = subprocess.Popen(cmd + args + every_step + ["--out", str(victim)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    partial = []
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline:  # every step writes a checkpoint: catch one mid-write
        if victim.is_dir() and (partial := [p for p in os.scandir(victim) if p.name.startswith(".step-") and p.name.endswith(".tmp")
                                               and ".deleted." not in p.name]):
            try:
                started = find_checkpoints(victim) and any(os.scandir(partial[0].path))  # one complete, one half written
            except FileNotFoundError:  # renamed into place while we looked
                continue
            if started:
                proc.send_signal(signal.SIGKILL)
                break
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before a checkpoint write could be caught"
    assert any(p.name.endswith(".tmp") for p in victim.iterdir()), "the killed write left no partial directory"
    last = find_checkpoints(victim)[-1]
    ckpt = load_checkpoint(last)  # the last complete checkpoint is whole: weights, optimizer, state
    load_model(last)
    load_optimizer_state(ckpt)
    assert ckpt.trainer_state["step"] < 20

    subprocess.run(cmd + args + every_step + ["--out", str(victim), "--resume"], check=True, env=env, capture_output=True)
    assert not any(p.name.startswith(".step-") for p in victim.iterdir())  # the partial write was cleaned up
    subprocess.run(cmd + args + ["--train.ckpt_interval", "0", "--out", str(tmp_path / "full")], check=True, env=env, capture_output=True)
    a = load_file(str(tmp_path / "full" / "step-000020" / "model.safetensors"))
    b = load_file(str(victim / "step-000020" / "model.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _skip_worker(rank, data_dir, out, port, results):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    result = run(data_dir, out, bad_steps={(2, 1)}, skip_nonfinite=True, max_steps=4, grad_accum=1)
    results.put((rank, result.skipped_steps))


@pytest.mark.slow
def test_processes_agree_to_skip_a_step_only_one_of_them_saw_go_bad(data_dir, tmp_path):
    """Rank 1's micro-batch of step 3 is poisoned: both ranks skip it, as one process with both micro-batches does."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    mp.start_processes(_skip_worker, args=(data_dir, tmp_path / "two", port, results), nprocs=2, start_method="spawn")
    assert sorted(results.get() for _ in range(2)) == [(0, 1), (1, 1)]
    one = run(data_dir, tmp_path / "one", bad_steps={(2, 1)}, skip_nonfinite=True, max_steps=4, grad_accum=2)
    assert one.skipped_steps == 1
    a = load_file(str(tmp_path / "one" / "step-000004" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "step-000004" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=0, msg=k)


def _children(pid):
    """Process ids whose parent is `pid` (Linux /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the workers through /proc")
def test_killing_a_two_process_run_during_a_sharded_write_resumes_on_one(data_dir, tmp_path):
    """SIGKILL both torchrun workers while they write `dcp/`; the last complete checkpoint resumes on 1 process."""
    from lmforge.train import pretrain

    train = dict(max_steps=12, batch_size=4, lr=1e-2, min_lr=1e-3, warmup_steps=5, eval_interval=0, log_interval=1, seed=3,
                 keep_checkpoints=2)
    args = ["--model.preset", "tiny", "--train.device", "cpu", "--train.tensorboard", "false", "--train.threads", "1",
            "--train.ckpt_interval", "1", "--train.grad_accum", "1", "--train.parallel", "fsdp"]
    args += [a for k, v in train.items() for a in (f"--train.{k}", str(v))]
    victim = tmp_path / "killed"
    cmd, env = torchrun("-m", "lmforge", "pretrain", "--data", str(data_dir), "--out", str(victim), *args)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, )
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline:
        try:
            partial = [p for p in victim.glob(".step-*.tmp") if ".deleted." not in p.name]  # not an old one being deleted
            writing = find_checkpoints(victim) and any(any(os.scandir(p / "dcp")) for p in partial)
        except FileNotFoundError:  # renamed into place while we looked
            continue
        if writing:  # both workers (torchrun starts each in its own session), then the launcher: a lost machine
            workers = _children(proc.pid)
            for pid in workers:
                os.kill(pid, signal.SIGKILL)
            proc.kill()
            break
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before a sharded write could be caught"
    assert len(workers) == 2
    while any(Path(f"/proc/{pid}").exists() for pid in workers):
        time.sleep(0.01)
    assert any(p.exists() for p in partial), "the killed write left no partial directory"
    last = find_checkpoints(victim)[-1]
    assert (last / "dcp" / ".metadata").is_file() and load_checkpoint(last).trainer_state["step"] < 12

    resumed = pretrain(data_dir, victim, "tiny", tiny_train_config(**train, grad_accum=2), resume=True,
                       progress=False, log=lambda *a: None)
    full = pretrain(data_dir, tmp_path / "full", "tiny", tiny_train_config(**train, grad_accum=2, ckpt_interval=0),
                    progress=False, log=lambda *a: None)
    a, b = load_file(str(full.checkpoint / "model.safetensors")), load_file(str(resumed.checkpoint / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=0, msg=k)


def test_an_old_checkpoint_that_cannot_be_removed_is_one_warning_and_training_goes_on(data_dir, tmp_path, monkeypatch,
                                                                                      capsys):
    """Seen in review: a permission error deleting step-2 ended a healthy run with a traceback after the
    new checkpoint was saved. It costs disk, not the run: one warning (not one each save), and on."""
    replace = os.replace

    def refused(src, dst):
        if Path(src).name == "step-000002" and str(dst).endswith(".deleted.tmp"):
            raise PermissionError(errno.EPERM, "Operation not permitted", str(src), None, str(dst))
        replace(src, dst)

    monkeypatch.setattr(os, "replace", refused)
    run(data_dir, tmp_path / "run", bad_steps=(), keep_checkpoints=1)
    assert [p.name for p in find_checkpoints(tmp_path / "run")] == ["step-000002", "step-000008"]
    err = capsys.readouterr().err
    assert err.count("warning") == 1
    assert f"cannot remove the old checkpoint {tmp_path / 'run' / 'step-000002'} (Operation not permitted)" in err
