"""Data parallelism on CPU with gloo: 2 processes (DDP, FSDP2) train exactly what one process with
twice the accumulation trains, and their checkpoints resume on another world size."""

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, run_torchrun, tiny_train_config, train_losses as losses
from lmforge.checkpoint import find_checkpoints, load_model
from lmforge.config import preset
from lmforge.train import pretrain
from lmforge.train.checkpointing import SHARDED_DIR
from lmforge.train.distributed import World, micro_seed

quiet = dict(progress=False, log=lambda *a: None)
# 5 steps of 8 sequences; dropout on, so that the dropout masks must agree across world sizes too.
STEPS, BATCH = 5, 4
TRAIN = dict(max_steps=STEPS, batch_size=BATCH, lr=1e-2, min_lr=1e-3, seed=5, log_interval=1, eval_interval=0, ckpt_interval=3, warmup_steps=2)
ARGS = ["--model.preset", "tiny", "--model.dropout", "0.1", "--train.device", "cpu", "--train.tensorboard", "false",
        "--train.threads", "1"] + [a for k, v in TRAIN.items() for a in (f"--train.{k}", str(v))]


def test_micro_batches_of_ranks_tile_the_step():
    """Rank r of W with accumulation k takes micro-batches r*k .. r*k+k-1: together those of one process with W*k."""
    tiles = [list(World(rank=r, size=3).micro_batches(2)) for r in range(3)]
    assert tiles == [[0, 1], [2, 3], [4, 5]]
    assert sum(tiles, []) == list(World().micro_batches(6))
    assert micro_seed(5, 3, 1) == micro_seed(5, 3, 1) != micro_seed(5, 3, 2)


@pytest.fixture(scope="module")
def single(data_dir, tmp_path_factory):
    """The reference: one process, accumulation 2 (8 sequences per step)."""
    out = tmp_path_factory.mktemp("single") / "run"
    return pretrain(data_dir, out, preset("tiny", dropout=0.1), tiny_train_config(**TRAIN, grad_accum=2), **quiet)


def torchrun(data_dir, out, *extra):
    """`torchrun --nproc-per-node 2 -m lmforge pretrain ...` on CPU (gloo), one thread per process."""
    return run_torchrun("-m", "lmforge", "pretrain", "--data", str(data_dir), "--out", str(out), *ARGS, *extra)


def assert_same_weights(a_dir, b_dir, atol=1e-5):
    a, b = load_file(str(a_dir / "model.safetensors")), load_file(str(b_dir / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=k)


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_match_one_with_the_same_global_batch(single, data_dir, tmp_path, parallel):
    out = tmp_path / parallel
    proc = torchrun(data_dir, out, "--train.grad_accum", "1", "--train.parallel", parallel)
    assert f"2 processes ({parallel}); 8 sequences per step" in proc.stdout
    assert proc.stdout.count("done: step 5") == 1  # rank 0 alone reports
    np.testing.assert_allclose(losses(out), losses(single.out), atol=1e-5, rtol=0)
    ckpts = find_checkpoints(out)
    assert [p.name for p in ckpts] == ["step-000003", "step-000005"]
    assert_same_weights(ckpts[-1], single.checkpoint)
    assert (ckpts[-1] / SHARDED_DIR / ".metadata").is_file()
    model, ckpt = load_model(ckpts[-1])  # what every later stage reads
    assert ckpt.trainer_state["world_size"] == 2 and model.config == load_model(single.checkpoint)[0].config

    # The 2-process checkpoint of step 3 resumes on 1 process (accumulation 2): the same run.
    resumed = tmp_path / f"{parallel}-on-one"
    resumed.mkdir()
    shutil.copytree(ckpts[0], resumed / ckpts[0].name)
    run = pretrain(data_dir, resumed, preset("tiny", dropout=0.1), tiny_train_config(**TRAIN, grad_accum=2), resume=True, **quiet)
    assert_same_weights(run.checkpoint, single.checkpoint)
    np.testing.assert_allclose(losses(resumed), losses(single.out), atol=1e-5, rtol=0)


@pytest.mark.slow
def test_muon_under_fsdp_matches_one_process(data_dir, tmp_path):
    """Muon orthogonalises whole matrices: each FSDP2 rank gathers its shards, and the run equals one process."""
    muon = dict(optim="muon", muon_lr=0.02)
    single = pretrain(data_dir, tmp_path / "one", preset("tiny", dropout=0.1), tiny_train_config(**TRAIN, **muon, grad_accum=2), **quiet)
    out = tmp_path / "fsdp"
    torchrun(data_dir, out, "--train.grad_accum", "1", "--train.parallel", "fsdp", "--train.optim", "muon", "--train.muon_lr", "0.02")
    np.testing.assert_allclose(losses(out), losses(single.out), atol=1e-5, rtol=0)
    assert_same_weights(find_checkpoints(out)[-1], single.checkpoint)



@pytest.mark.slow
def test_masked_lm_on_two_processes_matches_one(data_dir, tmp_path):
    """Each rank's micro-batch masks its own number of tokens: the step is the mean over all of them
    (one all-reduce of the counts), as one process with twice the accumulation computes it."""
    shape = dict(n_layer=2, n_embd=64, n_head=4, mlp_hidden=128, context_length=64, dropout=0.1)
    one = pretrain(data_dir, tmp_path / "one", preset("bert-base", **shape), tiny_train_config(**TRAIN, grad_accum=2),
                   objective="mlm", **quiet)
    two = tmp_path / "two"
    bert = ["--model.preset", "bert-base", *(a for k, v in shape.items() for a in (f"--model.{k}", str(v)))]
    run_torchrun("-m", "lmforge", "pretrain", "--data", str(data_dir), "--out", str(two), *bert, *ARGS[4:],
                 "--objective", "mlm", "--train.grad_accum", "1")
    np.testing.assert_allclose(losses(two), losses(one.out), atol=1e-5, rtol=0)
    assert_same_weights(find_checkpoints(two)[-1], one.checkpoint)


@pytest.mark.slow
def test_one_process_checkpoint_resumes_on_two_with_fsdp(single, data_dir, tmp_path):
    """The single-file checkpoint (index-keyed optimizer state) is sharded onto FSDP2 parameters."""
    out = tmp_path / "run"
    out.mkdir()
    shutil.copytree(single.out / "step-000003", out / "step-000003")
    torchrun(data_dir, out, "--train.grad_accum", "1", "--train.parallel", "fsdp", "--resume")
    assert_same_weights(find_checkpoints(out)[-1], single.checkpoint)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_gpus_with_nccl_match_one(data_dir, tmp_path, parallel):
    cuda = dict(device="cuda", dtype="float32", compile=False)
    one = pretrain(data_dir, tmp_path / "one", preset("tiny", dropout=0.1), tiny_train_config(**TRAIN, **cuda, grad_accum=2), **quiet)
    out = tmp_path / parallel
    torchrun(data_dir, out, "--train.grad_accum", "1", "--train.parallel", parallel, "--train.device", "cuda",
             "--train.dtype", "float32", "--train.compile", "false")
    np.testing.assert_allclose(losses(out), losses(one.out), atol=1e-4, rtol=0)  # GPU reductions are not bitwise
    assert_same_weights(find_checkpoints(out)[-1], one.checkpoint, atol=1e-4)


def test_accumulation_reduces_gradients_once_per_step():
    """With accumulation 3, the first two micro-batches run no gradient collective and the last
    one does: DDP reduces its bucket once, FSDP2 reduce-scatters each shard group (2 blocks + root) once."""
    proc = run_torchrun(str(ROOT / "tests" / "train" / "collectives_probe.py"))
    calls = json.loads(proc.stdout.strip().splitlines()[-1])
    assert calls["ddp"] == [[], [], ["ddp_bucket_all_reduce"]]
    assert calls["fsdp"][:2] == [[], []] and len(calls["fsdp"][2]) == 3


@pytest.mark.slow
def test_a_checkpoint_that_rank_0_cannot_write_stops_every_rank(data_dir, tmp_path):
    """Under FSDP2 the other ranks wait for rank 0's checkpoint directory: when rank 0 fails before
    making it (a full disk, here faked), they are told and stop with a line instead of hanging."""
    import subprocess

    from conftest import torchrun as torchrun_cmd

    script = tmp_path / "failing_save.py"
    script.write_text(
        "import os, sys\n"
        "import lmforge.train.sharded as c\n"
        "from lmforge.cli.main import main\n"
        "def full(*a, **k):\n"
        "    raise OSError(28, 'No space left on device')\n"
        "if os.environ['RANK'] == '0':\n"
        "    c.save_checkpoint = full\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    cmd, env = torchrun_cmd(str(script), "pretrain", "--data", str(data_dir), "--out", str(tmp_path / "run"), *ARGS,
                            "--train.parallel", "fsdp")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode != 0
    assert "no space left on device" in proc.stderr and "rank 0 could not write step-000003" in proc.stderr
    assert not find_checkpoints(tmp_path / "run")
