import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, tiny_train_config
from lmforge.checkpoint import find_checkpoints, load_model
from lmforge.config import preset
from lmforge.config.presets import SPEEDRUN
from lmforge.train import pretrain
from lmforge.utils.errors import UserError

quiet = dict(progress=False, log=lambda *a: None)


def test_short_run_lowers_validation_loss(trained_run):
    rows = [json.loads(l) for l in (trained_run.out / "metrics.jsonl").read_text().splitlines()]
    val = [r["val_loss"] for r in rows if r["kind"] == "val"]
    train = [r for r in rows if r["kind"] == "train"]
    assert len(val) == 3 and val[-1] < val[0] - 0.1
    # Chance is ln(512) = 6.24 nats; after 60 steps the model must beat it by more than a nat.
    assert trained_run.val_loss == val[-1] < math.log(512) - 1.0
    assert [r["step"] for r in train] == [10, 20, 30, 40, 50, 60]
    assert trained_run.val_bpb > 0 and trained_run.plot.exists() and trained_run.plot.stat().st_size > 5000


def test_muon_speedrun_model_learns(data_dir, tmp_path, trained_run):
    """--train.optim muon on the speedrun architecture learns, and in 40 steps beats AdamW on GPT-2's in 60."""
    cfg = tiny_train_config(max_steps=40, optim="muon", ckpt_interval=0)
    run = pretrain(data_dir, tmp_path / "muon", preset("tiny", **SPEEDRUN), cfg, **quiet)
    rows = [json.loads(l) for l in (run.out / "metrics.jsonl").read_text().splitlines()]
    val = [r["val_loss"] for r in rows if r["kind"] == "val"]
    assert val[-1] < val[0] < math.log(512) - 1.0
    assert run.val_loss < trained_run.val_loss - 0.5  # measured: 4.03 against 5.05


def test_run_writes_checkpoints(trained_run):
    ckpts = find_checkpoints(trained_run.out)
    assert [p.name for p in ckpts] == ["step-000040", "step-000060"]
    final = ckpts[-1]
    for name in ("config.json", "model.safetensors", "tokenizer.json", "trainer_state.json", "optimizer.safetensors", "metrics.jsonl"):
        assert (final / name).is_file(), name
    assert json.loads((final / "trainer_state.json").read_text())["step"] == 60
    assert not any(p.name.startswith(".") for p in trained_run.out.iterdir())  # no temporary leftovers


def test_resume_with_another_model_names_what_differs(trained_run, data_dir):
    with pytest.raises(UserError, match=r"differs from the one in .*: n_layer 3 \(saved: 2\); resume with the same --model"):
        pretrain(data_dir, trained_run.out, preset("tiny", n_layer=3), tiny_train_config(), resume=True, **quiet)


def test_existing_run_needs_resume(trained_run, data_dir):
    with pytest.raises(UserError, match="--resume"):
        pretrain(data_dir, trained_run.out, "tiny", tiny_train_config(), **quiet)


@pytest.mark.parametrize("optim", ["adamw", "muon"])
def test_resume_in_process_equals_uninterrupted(data_dir, tmp_path, optim):
    """Stop at step 10 (by running a copy whose checkpoint 10 we keep), resume to 20: same weights."""
    cfg = tiny_train_config(max_steps=20, ckpt_interval=10, optim=optim, eval_interval=0)
    model = preset("tiny", **SPEEDRUN) if optim == "muon" else "tiny"
    full = pretrain(data_dir, tmp_path / "full", model, cfg, **quiet)
    part = tmp_path / "part"
    part.mkdir()
    # Start the second run from the first run's step-10 checkpoint, as if it had died right after it.
    shutil.copytree(full.out / "step-000010", part / "step-000010")
    resumed = pretrain(data_dir, part, model, cfg, resume=True, **quiet)
    a = load_file(str(full.checkpoint / "model.safetensors"))
    b = load_file(str(resumed.checkpoint / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.slow
def test_kill_and_resume_equals_uninterrupted(data_dir, tmp_path):
    """SIGKILL a real `lmforge pretrain` process mid-run, resume it: bit-identical final weights."""
    args = [
        "--data", str(data_dir), "--model.preset", "tiny", "--model.dropout", "0.1",
        "--train.max_steps", "40", "--train.batch_size", "8", "--train.ckpt_interval", "10",
        "--train.eval_interval", "0", "--train.device", "cpu", "--train.tensorboard", "false",
        "--train.seed", "3", "--train.threads", "1",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    cmd = [sys.executable, "-m", "lmforge", "pretrain"]
    subprocess.run(cmd + args + ["--out", str(tmp_path / "full")], check=True, env=env, capture_output=True)

    victim = tmp_path / "killed"
    proc = subprocess.Popen(cmd + args + ["--out", str(victim)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (victim / "step-000020").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    steps = [p.name for p in find_checkpoints(victim)]
    assert "step-000040" not in steps, "the run finished before it could be killed"
    subprocess.run(cmd + args + ["--out", str(victim), "--resume"], check=True, env=env, capture_output=True)

    a = load_file(str(tmp_path / "full" / "step-000040" / "model.safetensors"))
    b = load_file(str(victim / "step-000040" / "model.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), k
    rows = [json.loads(l) for l in (victim / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == list(range(10, 41, 10))


def test_ctrl_c_during_a_checkpoint_step_writes_that_checkpoint_once(data_dir, tmp_path, monkeypatch):
    import lmforge.train.loop as loop
    from lmforge.train.checkpointing import Checkpointer

    saves, save, lr_at = [], Checkpointer.save, loop.lr_at
    monkeypatch.setattr(Checkpointer, "save", lambda self, step, *a: saves.append(step) or save(self, step, *a))
    # Ctrl-C while step 4 (a checkpoint step) trains: it finishes, is saved, and the run stops there.
    monkeypatch.setattr(loop, "lr_at", lambda step, cfg: (step == 3 and os.kill(os.getpid(), signal.SIGINT)) or lr_at(step, cfg))
    cfg = tiny_train_config(max_steps=10, ckpt_interval=4, eval_interval=0)
    with pytest.raises(UserError, match="interrupted at step 4"):
        pretrain(data_dir, tmp_path / "run", "tiny", cfg, **quiet)
    assert saves == [4] and [p.name for p in find_checkpoints(tmp_path / "run")] == ["step-000004"]


def _signal_at(monkeypatch, sig, when, step=4):
    """The process sends itself `sig` as the run's step `step` (its last) trains, or as its checkpoint is written."""
    import lmforge.train.loop as loop
    from lmforge.train.checkpointing import Checkpointer
    from lmforge.train.optim import lr_at  # the original, under any earlier patch

    if when == "last step":
        monkeypatch.setattr(loop, "lr_at", lambda s, cfg: (s == step - 1 and os.kill(os.getpid(), sig)) or lr_at(s, cfg))
    else:
        save = Checkpointer.save
        monkeypatch.setattr(Checkpointer, "save", lambda self, s, *a: (s == step and os.kill(os.getpid(), sig)) or save(self, s, *a))


class _Terminated(Exception):
    pass


@pytest.mark.parametrize("when", ["last step", "final checkpoint"])
def test_a_sigterm_too_late_to_stop_the_run_reaches_the_callers_handler_once_the_run_is_saved(data_dir, tmp_path, monkeypatch, when):
    """Stopping after the last step is finishing: the signal was dropped, and a bench under `timeout`
    went on to its next row. Now the caller's own handler gets it, as if it came just after the run."""
    def terminated(signum, frame):
        raise _Terminated

    _signal_at(monkeypatch, signal.SIGTERM, when)
    previous = signal.signal(signal.SIGTERM, terminated)
    try:
        with pytest.raises(_Terminated):
            pretrain(data_dir, tmp_path / "run", "tiny", tiny_train_config(max_steps=4, eval_interval=4), **quiet)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert [p.name for p in find_checkpoints(tmp_path / "run")] == ["step-000004"]
    assert (tmp_path / "run" / "loss.png").is_file()  # the run had ended


def test_ctrl_c_in_the_last_step_is_an_interrupt_naming_the_final_checkpoint_and_an_ignored_sigterm_stays_ignored(
        data_dir, tmp_path, monkeypatch):
    from lmforge.train import Interrupted

    _signal_at(monkeypatch, signal.SIGINT, "last step")
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # Python's own: KeyboardInterrupt
    try:
        with pytest.raises(Interrupted, match="interrupted at step 4; checkpoint saved to") as e:
            pretrain(data_dir, tmp_path / "a", "tiny", tiny_train_config(max_steps=4), **quiet)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert e.value.checkpoint == tmp_path / "a" / "step-000004" and e.value.checkpoint.is_dir()

    _signal_at(monkeypatch, signal.SIGTERM, "last step")
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        assert pretrain(data_dir, tmp_path / "b", "tiny", tiny_train_config(max_steps=4), **quiet).step == 4
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_sigterm_in_the_last_step_ends_the_cli_in_one_line_naming_the_checkpoint(data_dir, tmp_path, monkeypatch, capsys):
    from lmforge.cli.main import main

    _signal_at(monkeypatch, signal.SIGTERM, "last step")
    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the CLI's own handler goes in over the default only
    try:
        code = main(["pretrain", "--data", str(data_dir), "--out", str(tmp_path / "run"), "--model.preset", "tiny",
                     "--train.max_steps", "4", "--train.batch_size", "2", "--train.eval_interval", "0",
                     "--train.device", "cpu", "--train.tensorboard", "false", "--train.threads", "1"])
    finally:
        signal.signal(signal.SIGTERM, previous)
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == f"lmforge: error: interrupted at step 4; checkpoint saved to {tmp_path / 'run' / 'step-000004'}; continue with --resume"


@pytest.mark.slow
def test_ctrl_c_saves_the_finished_steps(data_dir, tmp_path):
    """SIGINT stops at a step boundary, writes a checkpoint there and says how to resume."""
    out = tmp_path / "run"
    args = [
        sys.executable, "-m", "lmforge", "pretrain", "--data", str(data_dir), "--out", str(out),
        "--model.preset", "tiny", "--train.max_steps", "100000", "--train.batch_size", "4",
        "--train.ckpt_interval", "5", "--train.eval_interval", "0", "--train.device", "cpu",
        "--train.tensorboard", "false", "--train.threads", "1",
    ]
    proc = subprocess.Popen(args, env={**os.environ, "PYTHONPATH": str(ROOT / "src")}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "step-000005").exists() and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    last = err.strip().splitlines()[-1]
    assert proc.returncode == 2 and "Traceback" not in err
    assert last.startswith("lmforge: error: interrupted at step ") and "--resume" in last
    step = int(last.split("interrupted at step ")[1].split(";")[0])
    assert find_checkpoints(out)[-1].name == f"step-{step:06d}"


def test_resume_from_a_checkpoint_without_trainer_state_is_one_line(data_dir, tmp_path, trained_run):
    shutil.copytree(trained_run.checkpoint, tmp_path / "run" / trained_run.checkpoint.name)
    (tmp_path / "run" / trained_run.checkpoint.name / "trainer_state.json").unlink()
    with pytest.raises(UserError, match="has no trainer state .* drop --resume"):
        pretrain(data_dir, tmp_path / "run", "tiny", tiny_train_config(max_steps=70), resume=True, **quiet)


def test_out_inside_the_data_directory_is_refused(data_dir, tmp_path):
    """A later `lmforge prepare --out DATA` replaces the whole directory: checkpoints there would vanish."""
    import shutil as _shutil

    data = tmp_path / "data"
    _shutil.copytree(data_dir, data)
    for out in (data, data / "run", data / "." / "runs" / "a"):
        with pytest.raises(UserError, match="(is|is inside) the data directory"):
            pretrain(data, out, "tiny", tiny_train_config(max_steps=1), **quiet)
    assert sorted(p.name for p in data.iterdir()) == sorted(p.name for p in data_dir.iterdir())


def test_a_tokenizer_that_does_not_match_the_shards_is_refused(data_dir, tmp_path):
    import shutil as _shutil

    from lmforge.tokenizer import Tokenizer

    data = tmp_path / "data"
    _shutil.copytree(data_dir, data)
    Tokenizer.train(["other text entirely\n" * 100], vocab_size=300, show_progress=False).save(data)
    with pytest.raises(UserError, match="tokenizer.json does not match the one the shards were made with"):
        pretrain(data, tmp_path / "run", "tiny", tiny_train_config(max_steps=1), **quiet)
    assert not (tmp_path / "run").exists()


def test_a_val_split_too_short_for_one_window_says_validation_is_off(corpus_file, tokenizer_dir, tmp_path):
    from lmforge.data import prepare

    prepare([corpus_file], tokenizer_dir, tmp_path / "data", val_fraction=0.0005, progress=False)
    lines = []
    run = pretrain(tmp_path / "data", tmp_path / "run", "tiny", tiny_train_config(max_steps=2, eval_interval=1),
                   progress=False, log=lines.append)
    assert run.val_loss is None
    said = [line for line in lines if "validation is off" in line]
    assert len(said) == 1 and "seq_len 64" in said[0] and "--val-fraction" in said[0], lines


def test_parameter_counts_agree_with_each_other(trained_run):
    """A full pretrain trains every parameter it counts: the trainable count is of the same total
    (learned positions left out of both, as num_params leaves them out; they had been in one only)."""
    assert trained_run.trainable_params == trained_run.params == load_model(trained_run.checkpoint)[0].num_params()


# ------------------------------------------------------------- what --resume refuses before training
@pytest.fixture(scope="module")
def run2(data_dir, tmp_path_factory):
    """A finished 2-step run with its checkpoint at step 2."""
    out = tmp_path_factory.mktemp("run2") / "run"
    return pretrain(data_dir, out, "tiny", tiny_train_config(max_steps=2, ckpt_interval=2, eval_interval=0, log_interval=1), **quiet)


def copy_of(run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(run.out, out)
    return out


def train2(data_dir, out, max_steps=4, model="tiny", **kwargs):
    cfg = tiny_train_config(max_steps=max_steps, ckpt_interval=2, eval_interval=0, log_interval=1)
    return pretrain(data_dir, out, model, cfg, **kwargs, **quiet)


@pytest.mark.parametrize("files", [["config.json"], ["model.safetensors"]])
def test_resume_refuses_a_partial_step_directory_before_training(run2, data_dir, tmp_path, files):
    """Seen in review: with a partial step-000004 (a copy in progress), --resume either failed on its missing
    tokenizer.json or, without its config.json, trained steps 3-4 and then died saving step 4: work lost."""
    out = copy_of(run2, tmp_path)
    (out / "step-000004").mkdir()
    for f in files:
        shutil.copyfile(out / "step-000002" / f, out / "step-000004" / f)
    metrics = (out / "metrics.jsonl").read_text()
    with pytest.raises(UserError, match=r"step-000004 is not a complete checkpoint \(it lacks .*tokenizer.json\); "
                                        r"move it out of .*run .*then run again"):
        train2(data_dir, out, resume=True)
    assert (out / "metrics.jsonl").read_text() == metrics  # refused before any step trained


def test_a_new_run_refuses_a_partial_step_directory_before_training(run2, data_dir, tmp_path):
    """Seen in review: a run folder holding only a partial step-000002 trained, then died saving step 2."""
    out = tmp_path / "run"
    (out / "step-000002").mkdir(parents=True)
    shutil.copyfile(run2.checkpoint / "config.json", out / "step-000002" / "config.json")
    with pytest.raises(UserError, match=r"step-000002 is not a complete checkpoint .*move it out"):
        train2(data_dir, out, max_steps=2)
    assert sorted(p.name for p in out.iterdir()) == ["step-000002"]


@pytest.mark.parametrize("damage", ["optimizer", "trainer_state", "weights"])
def test_a_damaged_latest_step_says_to_move_it_aside(run2, data_dir, tmp_path, damage):
    """--resume takes the latest step and no other: `resume from another step` told the user nothing to do."""
    out = copy_of(run2, tmp_path)
    name = {"optimizer": "optimizer.safetensors", "trainer_state": "trainer_state.json", "weights": "model.safetensors"}[damage]
    file = out / "step-000002" / name
    file.write_bytes(file.read_bytes()[:50])
    with pytest.raises(UserError, match=rf"step-000002/{name} .*move .*step-000002 out of the run directory") as err:
        train2(data_dir, out, resume=True)
    assert "\n" not in str(err.value)


def test_resume_with_max_steps_below_the_saved_step_is_refused(run2, data_dir, tmp_path):
    """Seen in review: it printed `done: step 2, train loss nan` (and NaN in --json)."""
    out = copy_of(run2, tmp_path)
    with pytest.raises(UserError, match=r"step-000002 is already at step 2; --train.max_steps 1 is below it"):
        train2(data_dir, out, max_steps=1, resume=True)
    done = train2(data_dir, out, max_steps=2, resume=True)  # at the saved step: how the run ended
    assert done.step == 2 and done.train_loss == run2.train_loss


def test_resume_refuses_a_damaged_trainer_state_that_inference_ignores(run2, data_dir, tmp_path):
    out = copy_of(run2, tmp_path)
    (out / "step-000002" / "trainer_state.json").write_text("[1, 2")
    load_model(out)  # inference never reads it
    with pytest.raises(UserError, match=r"trainer_state.json is corrupt .*move .*step-000002 out of the run directory"):
        train2(data_dir, out, resume=True)


def test_resume_with_the_presets_shape_spelled_out_is_the_same_model(run2, data_dir, tmp_path):
    """Seen in review: `model config differs: preset None (saved: 'tiny')` for the identical shape."""
    out = copy_of(run2, tmp_path)
    spelled = preset("tiny").replace(preset=None)
    assert train2(data_dir, out, model=spelled, resume=True).step == 4
    with pytest.raises(UserError, match=r"differs from the one in .*: n_layer 3 \(saved: 2\); resume") as err:
        train2(data_dir, out, model=spelled.replace(n_layer=3), max_steps=6, resume=True)
    assert "preset None" not in str(err.value)


def test_run_result_json_has_no_nan():
    """A run whose last step was skipped (--train.skip_nonfinite) has no train loss: null, not NaN, in --json."""
    from lmforge.train.loop import RunResult

    result = RunResult(out=ROOT, checkpoint=ROOT, step=1, train_loss=math.nan, val_loss=None, val_bpb=None,
                       seconds=1.0, tokens_per_s=math.inf, params=1, plot=ROOT)
    d = result.to_dict()
    assert d["train_loss"] is None and d["tokens_per_s"] is None
    json.dumps(d, allow_nan=False)


@pytest.mark.parametrize("shape", [
    dict(n_layer=3),
    dict(n_layer=3, position="rotary", norm="rmsnorm", mlp="swiglu", n_kv_head=2, bias=False, tie_embeddings=False),
    dict(n_layer=2, arch="encoder", norm_position="post", embed_norm=True, type_vocab_size=2, position="sinusoidal"),
    dict(n_layer=3, n_encoder_layer=2, arch="encoder-decoder", position="sinusoidal"),
    dict(n_layer=1, arch="encoder-decoder"),
])
def test_the_memory_checks_parameter_count_is_the_built_models(shape):
    """The count extrapolates from models of one and two blocks; it must be the real model's count."""
    from lmforge.model import Transformer
    from lmforge.train.pretrain import count_params

    cfg = preset("tiny", vocab_size=300, **shape)
    net = Transformer(cfg)
    assert count_params(cfg) == (net.num_params(exclude_positions=False), sum(b.numel() for b in net.buffers()))


def test_a_model_too_large_for_memory_is_one_line_before_any_weight_exists(data_dir, tmp_path, monkeypatch):
    """Seen in review: `--model.n_layer 100000000` grew to 22 GB and was killed by the OOM killer, no message."""
    pretrain_module = sys.modules["lmforge.train.pretrain"]  # lmforge.train.pretrain is the function

    real = pretrain_module.Transformer

    def only_on_meta(cfg):  # the check may build shapes on the meta device; a real weight is a failure
        assert torch.get_default_device().type == "meta", "a model was built before the memory check"
        return real(cfg)

    monkeypatch.setattr(pretrain_module, "Transformer", only_on_meta)
    huge = preset("tiny", n_layer=1000, n_embd=2**16)  # 5e13 parameters: 800 TB to train
    with pytest.raises(UserError, match=r"^this model \(51,5\d\d,\d{3},\d{3},\d{3} parameters\) needs at least "
                                        r"[\d,.]+ GB of CPU memory to train \(weights, gradients and adamw state\), "
                                        r"but [\d,.]+ GB is available; choose a smaller model") as e:
        pretrain(data_dir, tmp_path / "r", huge, tiny_train_config(), **quiet)
    assert "\n" not in str(e.value) and not (tmp_path / "r").exists()


def test_the_memory_check_refuses_only_what_exceeds_the_available_memory(data_dir, tmp_path, monkeypatch):
    pretrain_module = sys.modules["lmforge.train.pretrain"]  # lmforge.train.pretrain is the function

    cfg, train = preset("tiny", vocab_size=512), tiny_train_config(max_steps=1, eval_interval=0, ckpt_interval=0)
    params, buffers = pretrain_module.count_params(cfg)
    needed = params * 16 + buffers * 4  # fp32 weights, gradients, AdamW's two moments; fp32 position tables
    monkeypatch.setattr(pretrain_module, "free_memory", lambda device: needed - 1)
    with pytest.raises(UserError, match=rf"needs at least {needed / 1e9:.1f} GB of CPU memory"):
        pretrain(data_dir, tmp_path / "r", cfg, train, **quiet)
    monkeypatch.setattr(pretrain_module, "free_memory", lambda device: needed)  # fits: trains
    assert pretrain(data_dir, tmp_path / "r", cfg, train, **quiet).step == 1
    monkeypatch.setattr(pretrain_module, "free_memory", lambda device: None)  # cannot be told: nothing refused
    pretrain_module.check_memory(cfg, train)


def test_the_memory_check_on_a_gpu_counts_fsdp_shards(monkeypatch):
    """On CUDA the GPU holds weights, gradients and optimizer state (FSDP: a shard of them per process) and
    the CPU the weights it builds first."""
    pretrain_module = sys.modules["lmforge.train.pretrain"]  # lmforge.train.pretrain is the function
    from lmforge.config import TrainConfig

    cfg = preset("tiny", vocab_size=512)
    params, buffers = pretrain_module.count_params(cfg)
    gpu_free = params * 16 // 2  # half of what one unsharded process needs
    monkeypatch.setattr(pretrain_module, "resolve_device", lambda name: torch.device("cuda", 0))
    monkeypatch.setattr(pretrain_module, "free_memory", lambda d: gpu_free if d.type == "cuda" else 10**12)
    with pytest.raises(UserError, match=r"of GPU memory to train \(weights, gradients and adamw state\)"):
        pretrain_module.check_memory(cfg, TrainConfig(device="cuda"))
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    pretrain_module.check_memory(cfg, TrainConfig(device="cuda", parallel="fsdp"))  # a quarter each: fits
    with pytest.raises(UserError, match="GPU memory"):
        pretrain_module.check_memory(cfg, TrainConfig(device="cuda", parallel="ddp"))
    monkeypatch.setattr(pretrain_module, "free_memory", lambda d: 10**12 if d.type == "cuda" else (params + buffers) * 4 * 3)
    with pytest.raises(UserError, match=r"of CPU memory to train \(weights, built there before they move to the GPU\)"):
        pretrain_module.check_memory(cfg, TrainConfig(device="cuda", parallel="fsdp"))  # 4 processes build it here
