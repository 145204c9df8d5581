"""What `--resume` refuses, in one line and without running anything from the checkpoint: pickles in a
sharded `dcp/` directory, another tokenizer or optimizer than the run's, damaged trainer state or
metrics; what it still resumes (a real `dcp/` checkpoint, a metrics log cut mid-line); and what a resumed
run takes from its config (optimizer settings; a warning for other batches) and from the checkpoint
(moments, token count, a finished run's end)."""

import json
import pickle
import shutil
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

from conftest import tiny_train_config
from lmforge.checkpoint import load_checkpoint, load_model
from lmforge.checkpoint.store import load_optimizer_state
from lmforge.config import preset
from lmforge.data import prepare, train_tokenizer
from lmforge.train import pretrain
from lmforge.train.checkpointing import Checkpointer
from lmforge.train.metrics import read_metrics
from lmforge.train.optim import build_optimizer
from lmforge.utils.errors import UserError

quiet = dict(progress=False, log=lambda *a: None)
TRAIN = dict(max_steps=4, ckpt_interval=2, eval_interval=0, log_interval=1, keep_checkpoints=5)


@pytest.fixture(scope="module")
def run4(data_dir, tmp_path_factory):
    """A 4-step run with checkpoints at steps 2 and 4: resuming step 2 to 4 must give its step 4."""
    return pretrain(data_dir, tmp_path_factory.mktemp("run4") / "run", "tiny", tiny_train_config(**TRAIN), **quiet)


def from_step_2(run4, tmp_path) -> tuple[Path, Path]:
    """A run directory holding a copy of run4's step-2 checkpoint, as if the run had died right after it."""
    out = tmp_path / "run"
    out.mkdir()
    shutil.copytree(run4.out / "step-000002", out / "step-000002")
    return out, out / "step-000002"


def resume(data_dir, out, **train):
    return pretrain(data_dir, out, "tiny", tiny_train_config(**{**TRAIN, **train}), resume=True, **quiet)


class Marker:
    """Unpickling this creates `path`: proof that a pickle's code ran."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def write_dcp(ckpt: Path, tamper=lambda state: None) -> None:
    """Add the `dcp/` directory that a run of several processes writes (here one process's shard:
    the same metadata classes), holding `ckpt`'s weights and optimizer state, after `tamper(state)`."""
    net, loaded = load_model(ckpt)
    optimizer = build_optimizer(net, tiny_train_config(**TRAIN), torch.device("cpu"))
    optimizer.load_state_dict(load_optimizer_state(loaded))
    state = {"model": get_model_state_dict(net), "optim": get_optimizer_state_dict(net, optimizer)}
    tamper(state)
    with warnings.catch_warnings():  # one process writing a sharded checkpoint is what we mean
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(state, checkpoint_id=str(ckpt / "dcp"), no_dist=True)


def test_a_sharded_checkpoint_resumes_through_the_safe_reader(run4, data_dir, tmp_path):
    out, ckpt = from_step_2(run4, tmp_path)
    write_dcp(ckpt)
    # Weights read from dcp/ alone: model.safetensors zeroed shows they did not come from it.
    weights = load_file(str(ckpt / "model.safetensors"))
    save_file({k: torch.zeros_like(v) for k, v in weights.items()}, str(ckpt / "model.safetensors"))
    resumed = resume(data_dir, out)
    a, b = load_file(str(run4.checkpoint / "model.safetensors")), load_file(str(resumed.checkpoint / "model.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_a_pickle_in_dcp_metadata_is_refused_without_running_it(run4, data_dir, tmp_path):
    out, ckpt = from_step_2(run4, tmp_path)
    write_dcp(ckpt)
    (ckpt / "dcp" / ".metadata").write_bytes(pickle.dumps(Marker(tmp_path / "ran")))
    with pytest.raises(UserError, match=r"step-000002/dcp is unreadable \(.metadata refers to io.open, .*refused.*"
                                        r"resume from another step"):
        resume(data_dir, out)
    assert not (tmp_path / "ran").exists()


def test_a_pickle_in_a_dcp_value_is_refused_without_running_it(run4, data_dir, tmp_path):
    """Non-tensor values (the optimizer's param-group settings) are pickles too: weights_only refuses one that calls."""
    out, ckpt = from_step_2(run4, tmp_path)
    write_dcp(ckpt, tamper=lambda state: state["optim"]["param_groups"][0].update(lr=Marker(tmp_path / "ran")))
    with pytest.raises(UserError, match=r"step-000002/dcp is unreadable \(optim\.param_groups\.0\.lr holds what a safe load "
                                        r"refuses \(.*\): nothing was run\); .*resume from another step") as e:
        resume(data_dir, out)
    assert not (tmp_path / "ran").exists()
    assert "weights_only` set to `False`" not in str(e.value)  # torch's advice is the unsafe way: not passed on


@pytest.mark.parametrize("field, value", [("state_dict_metadata", [1, 2]), ("storage_data", None)])
def test_dcp_metadata_of_the_right_classes_but_the_wrong_shape_is_one_line(run4, data_dir, tmp_path, field, value):
    """Seen in review: a list for the state's metadata, or no storage data, gave tracebacks from inside DCP."""
    out, ckpt = from_step_2(run4, tmp_path)
    write_dcp(ckpt)
    meta = ckpt / "dcp" / ".metadata"
    metadata = pickle.loads(meta.read_bytes())
    setattr(metadata, field, value)
    meta.write_bytes(pickle.dumps(metadata))
    with pytest.raises(UserError, match=rf"step-000002/dcp is unreadable \(.metadata's {field} is a "
                                        rf"{type(value).__name__}, not a dict\)"):
        resume(data_dir, out)


@pytest.mark.parametrize("failure", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_a_failed_shard_write_raises_the_ranks_own_error(failure, monkeypatch, tmp_path):
    """Seen in review: a full disk (or Ctrl-C) on one rank during the dcp/ write gave every rank a
    CheckpointException of all their tracebacks, which the CLI could not turn into its one line."""
    from torch.distributed.checkpoint.api import CheckpointException

    from lmforge.train import sharded

    def fail(*args, **kwargs):
        raise CheckpointException("failed to write", {1: (failure, None)})

    monkeypatch.setattr(sharded.dcp, "save", fail)
    with pytest.raises(type(failure)) as e:
        sharded._write({}, tmp_path / "dcp")
    assert e.value is failure


def test_a_truncated_dcp_metadata_is_one_line(run4, data_dir, tmp_path):
    out, ckpt = from_step_2(run4, tmp_path)
    write_dcp(ckpt)
    meta = ckpt / "dcp" / ".metadata"
    meta.write_bytes(meta.read_bytes()[:100])
    with pytest.raises(UserError, match=r"step-000002/dcp is unreadable \(pickle data was truncated\)"):
        resume(data_dir, out)


def test_resume_on_data_of_another_tokenizer_is_refused(run4, data_dir, corpus_file, tmp_path):
    """Token 300 of another tokenizer is other text: the model would silently learn a new language."""
    other_text = tmp_path / "other.txt"
    other_text.write_text(corpus_file.read_text(encoding="utf-8")[60_000:], encoding="utf-8")
    train_tokenizer([other_text], 512, tmp_path / "tok")  # the same vocab size: the model config matches
    prepare([other_text], tmp_path / "tok", tmp_path / "data", val_fraction=0.1, progress=False)
    out, _ = from_step_2(run4, tmp_path)
    with pytest.raises(UserError, match=r"step-000002 was trained with another tokenizer \(sha256 \w{12}\) than this run's "
                                        rf"data \(sha256 \w{{12}}\); resume on the data it was trained on \({data_dir}\)"):
        resume(tmp_path / "data", out)
    # Another size too (seen in review: the vocab_size difference was named, with advice about --model).
    train_tokenizer([other_text], 300, tmp_path / "tok300")
    prepare([other_text], tmp_path / "tok300", tmp_path / "data300", val_fraction=0.1, progress=False)
    with pytest.raises(UserError, match=r"step-000002 was trained with another tokenizer"):
        resume(tmp_path / "data300", out)


def test_resume_with_another_optimizer_names_the_flag(run4, data_dir, tmp_path):
    out, _ = from_step_2(run4, tmp_path)
    with pytest.raises(UserError, match=r"trained with --train.optim adamw, this run asks for muon; resume with --train.optim adamw"):
        resume(data_dir, out, optim="muon")


def test_an_optimizer_state_that_does_not_fit_is_one_line(run4, data_dir, tmp_path):
    """A checkpoint without the saved train config (so no up-front check) whose groups do not fit Muon's."""
    out, ckpt = from_step_2(run4, tmp_path)
    state = json.loads((ckpt / "trainer_state.json").read_text())
    del state["train"]
    (ckpt / "trainer_state.json").write_text(json.dumps(state))
    with pytest.raises(UserError, match=r"the optimizer state in .*step-000002 does not fit this run's optimizer \(.*\); "
                                        "resume with the --train settings"):
        resume(data_dir, out, optim="muon")


@pytest.mark.parametrize("damage,message", [
    (lambda s: s.update(step="eight"), r"trainer_state.json holds step 'eight', not a step number; use another checkpoint"),
    (lambda s: s.update(step=-1), r"trainer_state.json holds step -1, not a step number"),
    (lambda s: s.update(optimizer={"x": 1}), r"trainer_state.json has a damaged optimizer entry \(no state\)"),
    (lambda s: s.update(optimizer=json.loads(json.dumps(s["optimizer"]).replace(".exp_avg\"", ".EXP\""))),
     r"optimizer.safetensors lacks the tensor 'optimizer.state.0.EXP' that trainer_state.json names"),
])
def test_damaged_trainer_state_is_one_line_naming_the_checkpoint(run4, data_dir, tmp_path, damage, message):
    out, ckpt = from_step_2(run4, tmp_path)
    state = json.loads((ckpt / "trainer_state.json").read_text())
    damage(state)
    (ckpt / "trainer_state.json").write_text(json.dumps(state))
    with pytest.raises(UserError, match=r"step-000002.*" + message):
        resume(data_dir, out)


def test_a_torn_last_metrics_line_is_dropped_on_resume(run4, data_dir, tmp_path):
    """A run killed (or out of disk) mid-append leaves half a line: the step it logged is trained again."""
    out, _ = from_step_2(run4, tmp_path)
    shutil.copyfile(run4.out / "step-000002" / "metrics.jsonl", out / "metrics.jsonl")
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "step": 3, "tok')
    resume(data_dir, out)
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"] == [1, 2, 3, 4]


def test_a_bad_metrics_line_before_the_last_is_one_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"kind": "train", "step": 1}\n\n{"kind": "tr\n{"kind": "train", "step": 3}\n')
    with pytest.raises(UserError, match=r"metrics.jsonl:3 is not a JSON object with a step \(.*\); delete that line"):
        read_metrics(path)
    path.write_text('{"kind": "train", "step": 1}\n{"kind": "tr\n')
    assert read_metrics(path) == [{"kind": "train", "step": 1}]


@pytest.mark.parametrize("failure", [torch.cuda.OutOfMemoryError("CUDA out of memory"), KeyboardInterrupt()])
def test_a_failure_that_is_not_the_checkpoints_is_not_called_damage(run4, data_dir, tmp_path, monkeypatch, failure):
    """Out of memory or Ctrl-C while reading dcp/ stays what it is; only a read error is 'unreadable'."""
    from lmforge.train.sharded import _SafeReader

    out, ckpt = from_step_2(run4, tmp_path)
    write_dcp(ckpt)

    def fail(self, *args, **kwargs):
        raise failure

    monkeypatch.setattr(_SafeReader, "read_data", fail)
    with pytest.raises(type(failure)):
        resume(data_dir, out)


@pytest.mark.parametrize("sharded", [False, True])
def test_a_resumed_optimizer_trains_with_this_runs_settings_and_the_checkpoints_moments(run4, tmp_path, sharded):
    """Seen in review: weight decay, betas and AdamW's fused flag came back from the checkpoint over the config."""
    out, ckpt = from_step_2(run4, tmp_path)
    if sharded:
        write_dcp(ckpt)
    net, loaded = load_model(ckpt)
    saved = load_optimizer_state(loaded)
    assert saved["param_groups"][0]["weight_decay"] == 0.1 and not saved["param_groups"][0]["fused"]
    train = tiny_train_config(**{**TRAIN, "weight_decay": 0.5, "beta1": 0.8, "beta2": 0.99})
    optimizer = build_optimizer(net, train, torch.device("cuda"))  # as on CUDA: fused (which runs on the CPU too)
    Checkpointer(out, 5).restore(loaded, net, optimizer, torch.device("cpu"))
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.5, 0.0]
    assert all(tuple(g["betas"]) == (0.8, 0.99) and g["fused"] for g in optimizer.param_groups)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for i, p in enumerate(params):
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(optimizer.state[p][key], saved["state"][i][key]), (i, key)
    for p in params:
        p.grad = torch.ones_like(p)
    optimizer.step()  # the fused kernel takes the restored state


def test_a_resumed_muon_takes_this_runs_learning_rates_momentum_and_decay(data_dir, tmp_path):
    """Seen in review: a changed --train.lr changed Muon's learning rate, a changed muon_lr did not."""
    untied = preset("tiny", tie_embeddings=False)  # an output head: a matrix that AdamW decays
    run = pretrain(data_dir, tmp_path / "run", untied, tiny_train_config(**{**TRAIN, "max_steps": 2, "optim": "muon"}), **quiet)
    net, loaded = load_model(run.checkpoint)
    train = tiny_train_config(**{**TRAIN, "optim": "muon", "lr": 2e-2, "muon_lr": 0.05, "muon_momentum": 0.8,
                                 "weight_decay": 0.3})
    optimizer = build_optimizer(net, train, torch.device("cpu"))
    Checkpointer(run.out, 5).restore(loaded, net, optimizer, torch.device("cpu"))
    muon = [g for g in optimizer.param_groups if g["use_muon"]]
    assert muon and all(g["lr_scale"] == 0.05 / 2e-2 and g["momentum"] == 0.8 for g in muon)
    assert [g["weight_decay"] for g in optimizer.param_groups if not g["use_muon"]] == [0.3, 0.0]
    saved = load_optimizer_state(loaded)["state"]
    params = [p for g in optimizer.param_groups for p in g["params"]]
    buffers = [(p, i) for i, p in enumerate(params) if "momentum_buffer" in saved[i]]
    assert buffers and all(torch.equal(optimizer.state[p]["momentum_buffer"], saved[i]["momentum_buffer"]) for p, i in buffers)


def test_a_resume_on_other_batches_warns_and_keeps_counting_tokens(run4, data_dir, tmp_path):
    """Seen in review: another seed or seq_len passed without a word, and `tokens` became step x this run's batch."""
    out, ckpt = from_step_2(run4, tmp_path)
    saved = load_checkpoint(ckpt).trainer_state["tokens"]
    assert saved == 2 * 8 * 64
    lines = []
    train = tiny_train_config(**{**TRAIN, "batch_size": 4, "seq_len": 32, "seed": 8})
    result = pretrain(data_dir, out, "tiny", train, resume=True, progress=False, log=lines.append)
    assert [line.split(";")[0] for line in lines if line.startswith("warning:")] == [
        "warning: the checkpoint took 8 sequences per step and this run takes 4",
        "warning: the checkpoint was trained with --train.seed 7 and this run uses 8",
        "warning: the checkpoint was trained with --train.seq_len 64 and this run uses 32",
    ]
    assert load_checkpoint(result.checkpoint).trainer_state["tokens"] == saved + 2 * 4 * 32
    rows = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["tokens"] for r in rows] == [8 * 64, 2 * 8 * 64, saved + 4 * 32, saved + 2 * 4 * 32]


def test_a_resume_that_splits_the_step_into_other_micro_batches_warns(run4, data_dir, tmp_path):
    """Seen in review: 8 sequences per step as 4 x 2 are other sequences than 8 x 1 (each micro-batch is drawn
    by its index), and the resume said nothing. Processes and accumulation trade freely; batch_size does not."""
    out, _ = from_step_2(run4, tmp_path)
    lines = []
    pretrain(data_dir, out, "tiny", tiny_train_config(**{**TRAIN, "batch_size": 4, "grad_accum": 2}), resume=True,
             progress=False, log=lines.append)
    assert [line.split(";")[0] for line in lines if line.startswith("warning:")] == [
        "warning: the checkpoint drew micro-batches of 8 sequences and this run draws 4, other sequences for the "
        "same 8 per step"]


def test_a_resume_with_the_same_batches_says_nothing_and_an_old_checkpoint_counts_by_step(run4, data_dir, tmp_path):
    """seq_len None is the context (64): the same windows. A checkpoint from before tokens were counted."""
    out, ckpt = from_step_2(run4, tmp_path)
    state = json.loads((ckpt / "trainer_state.json").read_text())
    del state["tokens"]
    (ckpt / "trainer_state.json").write_text(json.dumps(state))
    lines = []
    result = pretrain(data_dir, out, "tiny", tiny_train_config(**{**TRAIN, "seq_len": 64}), resume=True, progress=False,
                      log=lines.append)
    assert not [line for line in lines if line.startswith("warning:")]
    assert load_checkpoint(result.checkpoint).trainer_state["tokens"] == 4 * 8 * 64


def test_resuming_a_finished_run_reports_its_end_and_logs_nothing_again(trained_run, data_dir, tmp_path):
    """Seen in review: every such resume added a second val row for the last step and said train loss nan."""
    out = tmp_path / "run"
    shutil.copytree(trained_run.out, out)
    before = read_metrics(out / "metrics.jsonl")
    assert any(r["kind"] == "val" and r["step"] == 60 for r in before)
    for _ in range(2):
        result = pretrain(data_dir, out, "tiny", tiny_train_config(), resume=True, **quiet)
        assert read_metrics(out / "metrics.jsonl") == before
        assert result.step == 60 and result.train_loss == trained_run.train_loss
        assert result.val_loss == pytest.approx(trained_run.val_loss, rel=1e-5)
