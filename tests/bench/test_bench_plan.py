"""What the GPU plan (bench/gpu/run.sh) relies on: the decode bench times what its rows name, a
bench cut short by `timeout` (SIGTERM) still prints JSON, and the quick phase's fallback and caps."""

import json
import os
import subprocess
import sys
import types

import pytest
import torch

from conftest import ROOT, bench_module, bench_rows


def test_decode_ttft_is_the_prefill_alone_and_ms_per_step_divides_by_the_steps_timed(monkeypatch):
    """The engine's TTFT window holds the prefill and no decode step (as transformers' 1-token
    generate); ms_per_step is the steps after the first one (which prefills and decodes) over their number."""
    from lmforge.config import preset
    from lmforge.infer.engine import Engine
    from lmforge.model import Transformer

    decode = bench_module("decode", monkeypatch)
    log, clock = [], iter([0.0, 10.0, 100.0, 130.0, 170.0])

    def perf_counter():
        log.append("t")
        return next(clock)
    monkeypatch.setattr(decode, "time", types.SimpleNamespace(perf_counter=perf_counter))
    for name in ("_prefill_rows", "_decode_all"):
        original = getattr(Engine, name)
        monkeypatch.setattr(Engine, name, lambda self, *a, _o=original, _n=name: (log.append(_n), _o(self, *a))[1])
    torch.manual_seed(0)
    model = Transformer(preset("tiny", vocab_size=256)).eval()
    prompts = torch.randint(0, 256, (2, 8))
    out = decode.run_engine(model, prompts, 6, False, torch.device("cpu"))
    timed = log[log.index("t"):]
    assert timed == ["t", "_prefill_rows", "t",  # TTFT: the prefill and the first token, no decode step
                     "t", "_prefill_rows", "_decode_all", "t",  # the first step: prefill, first token, second token
                     *["_decode_all"] * 4, "t"]  # 6 - 2 steps, one token each
    assert out["ttft_ms"] == 1e4 and out["first_step_ms"] == 3e4
    assert out["ms_per_step"] == pytest.approx(1e3 * (170 - 130) / 4) and out["tokens_per_s"] == pytest.approx(2 * 6 / 70)
    assert all(len(t) == 6 for t in out["tokens"])


def test_decode_profile_counts_kernels_not_the_annotated_ranges_on_the_gpu_timeline(monkeypatch):
    """record_function ranges show up as CUDA events too, spanning kernels already counted: counted
    as kernels, they inflated kernels_per_step and device time (torch's own table leaves them out)."""
    from torch.autograd import DeviceType

    decode = bench_module("decode", monkeypatch)

    class Engine:
        steps_left = 0

        def generate(self, prompts, params):
            pass

        def add(self, prompt, params):
            self.steps_left = 3

        def step(self):
            self.steps_left -= 1

        @property
        def has_work(self):
            return self.steps_left > 0

    def event(name, device_type, us, annotation=False):
        return types.SimpleNamespace(name=name, device_type=device_type, is_user_annotation=annotation, cpu_parent=None,
                                     time_range=types.SimpleNamespace(elapsed_us=lambda: us), cpu_time_total=us)

    events = [event("gemm", DeviceType.CUDA, 300.0), event("softmax", DeviceType.CUDA, 100.0),
              event("## decode step ##", DeviceType.CUDA, 500.0, annotation=True), event("aten::mm", DeviceType.CPU, 50.0)]

    class Profile:
        def __init__(self, activities):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def events(self):
            return events
    monkeypatch.setattr(decode, "build_engine", lambda *a: Engine())
    monkeypatch.setattr(decode, "sync", lambda device: None)
    monkeypatch.setattr(torch.profiler, "profile", Profile)
    out = decode.profile_engine(None, torch.zeros(2, 4, dtype=torch.long), 2, False, torch.device("cuda"), 16, None, "off")
    assert out["steps"] == 2 and out["kernels_per_step"] == 1.0  # gemm and softmax over 2 steps
    assert out["device_ms_per_step"] == pytest.approx(0.2) and [t["name"] for t in out["top"]] == ["gemm", "softmax"]


def test_prefix_cache_stopped_reports_the_whole_turns_and_a_stopped_line(monkeypatch, capsys):
    prefix = bench_module("prefix_cache", monkeypatch)
    monkeypatch.setattr(prefix, "load", lambda *a, **k: object())
    calls = []

    def scenario(kind):
        def run(lm, on, *args):
            calls.append((kind, on))
            if len(calls) == 5:  # warm-up, chat off, chat on, chat off, then SIGTERM in the second turn's "on"
                raise prefix.Stopped
            return {"what": kind, "prefix_cache": on, "ttft_ms": 1.0 if on else 3.0, "decode_step_ms": 0.5,
                    "ttft_less_decode_ms": 0.5 if on else 2.5, "seconds": 1.0, "outputs": ["same"]}
        return run
    monkeypatch.setattr(prefix, "chat", scenario("chat"))
    monkeypatch.setattr(prefix, "shared", scenario("shared"))
    off, on, ratio, stopped = bench_rows(prefix, monkeypatch, capsys, "ckpt", "--repeat", "2")
    assert (off["prefix_cache"], on["prefix_cache"], off["repeat"]) == (False, True, 1) and off["stopped_early"]
    assert (ratio["what"], ratio["ttft_ratio"], ratio["ttft_less_decode_ratio"]) == ("chat ratio", 3.0, 5.0)
    assert ratio["stopped_early"] and ratio["identical_outputs"]
    assert (stopped["what"], stopped["during"], stopped["stopped_early"]) == ("stopped", "chat", True)


def test_speculative_stopped_reports_the_whole_turns_and_a_stopped_line(monkeypatch, capsys):
    spec = bench_module("speculative", monkeypatch)
    lm = types.SimpleNamespace(tokenizer=types.SimpleNamespace(encode=lambda text: [1, 2, 3]), model=None)
    monkeypatch.setattr(spec, "load", lambda *a, **k: lm)
    monkeypatch.setattr(spec, "render_chat", lambda lm, messages: "text")
    monkeypatch.setattr(spec, "requests", lambda task, n: ["a"] * n)
    monkeypatch.setattr(spec, "build_engine", lambda *a, **k: object())
    monkeypatch.setattr(spec, "build_hf", lambda *a, **k: object())
    calls = []

    def timed(*a, **k):
        calls.append(1)
        if len(calls) == 2 + 4 + 2:  # two warm-ups, one whole turn of the four ways, then SIGTERM
            raise spec.Stopped
        return {"tokens": 4, "seconds": 1.0, "tokens_per_s": 4.0, "outputs": [[1, 2, 3, 4]], "drafted": 0, "accepted": 0, "steps": 4}
    monkeypatch.setattr(spec, "run_engine", timed)
    monkeypatch.setattr(spec, "run_hf", lambda *a, **k: {k: v for k, v in timed().items() if k in ("tokens", "seconds", "tokens_per_s", "outputs")})
    rows = bench_rows(spec, monkeypatch, capsys, "ckpt", "--docs", "1", "--repeat", "3")
    assert [r["what"] for r in rows] == ["lmforge", "lmforge speculative", "transformers", "transformers prompt lookup", "ratio", "stopped"]
    assert all(r["stopped_early"] for r in rows) and rows[0]["repeat"] == 1
    assert rows[4]["identical_outputs"] == {"lmforge": 1, "lmforge speculative": 1, "transformers": 1, "transformers prompt lookup": 1}
    assert (rows[5]["during"], rows[5]["turns_done"]) == ("turn 2", 1)


def test_finetune_tasks_stopped_prints_the_finished_rows_and_a_stopped_line(monkeypatch, capsys, tmp_path):
    from lmforge.train import Interrupted

    ft = bench_module("finetune_tasks", monkeypatch)

    def row(name, args, device):
        if name == "sst2-lora":
            raise Interrupted(7, tmp_path / "step-000007")  # what the training loop raises on SIGTERM
        if name == "wnut17":
            raise ft.Stopped  # SIGTERM outside training (scoring, say)
        return {"what": "finetune_tasks", "row": name}
    monkeypatch.setattr(ft, "_row", row)
    first, stopped = bench_rows(ft, monkeypatch, capsys, "--rows", "sst2-full,sst2-lora,wnut17", "--device", "cpu")
    assert first == {"what": "finetune_tasks", "row": "sst2-full"}
    assert (stopped["what"], stopped["during"], stopped["finished"]) == ("stopped", "sst2-lora", ["sst2-full"])
    assert "interrupted at step 7" in stopped["interrupted"]
    first, stopped = bench_rows(ft, monkeypatch, capsys, "--rows", "sst2-full,wnut17,squad", "--device", "cpu")
    assert (stopped["during"], stopped["finished"], stopped["stopped_early"]) == ("wnut17", ["sst2-full"], True)
    assert "interrupted" not in stopped


def test_scaling_study_stopped_prints_a_stopped_line_and_other_errors_end_in_one_line(monkeypatch, capsys, tmp_path):
    from lmforge.utils.errors import UserError

    study = bench_module("scaling_study", monkeypatch)
    (tmp_path / "study").mkdir()
    (tmp_path / "study" / "results.jsonl").write_text('{"name": "a"}\n{"name": "b"}\n')

    def interrupted(args, out, stage):
        stage[0] = "sweep"
        raise UserError("run c interrupted at step 3; start the same sweep again to resume it")
    monkeypatch.setattr(study, "study", interrupted)
    [row] = bench_rows(study, monkeypatch, capsys, "--out", str(tmp_path))
    assert (row["what"], row["during"], row["runs_done"], row["stopped_early"]) == ("stopped", "sweep", 2, True)

    def broken(args, out, stage):
        raise UserError("something else")
    monkeypatch.setattr(study, "study", broken)
    with pytest.raises(SystemExit) as e:  # after the stopped line's handling: one line, exit 2, no traceback
        bench_rows(study, monkeypatch, capsys, "--out", str(tmp_path))
    assert e.value.code == 2 and capsys.readouterr().err == "scaling_study.py: error: something else\n"


def bench_error(module, monkeypatch, capsys, *argv: str) -> str:
    """The one line that bench `module` ends with on bad input `argv` (exit status 2, no traceback)."""
    with pytest.raises(SystemExit) as e:
        bench_rows(module, monkeypatch, capsys, *argv)
    captured = capsys.readouterr()
    assert e.value.code == 2 and captured.out == "" and len(captured.err.splitlines()) == 1, captured.err
    return captured.err


def test_bad_input_ends_every_bench_in_one_error_line_before_the_slow_work(monkeypatch, capsys, tmp_path):
    """Seen in review: lmforge's UserError was a traceback in every bench, some after minutes of work
    (scaling_study trained the tokenizer and built the shards before it read --grid; time_to_loss
    before it looked up --preset; decode compiled and warmed the engine before a context too short)."""
    def never(*a, **k):
        raise AssertionError("the slow work started before the input was checked")

    train = bench_module("train_throughput", monkeypatch)
    monkeypatch.setattr(train, "Transformer", never)
    assert bench_error(train, monkeypatch, capsys, "--preset", "nope").startswith(
        "train_throughput.py: error: unknown model preset 'nope'")
    assert bench_error(train, monkeypatch, capsys, "--data", str(tmp_path / "none")).startswith(
        f"train_throughput.py: error: {tmp_path / 'none'} is not a prepared data directory")

    ttl = bench_module("time_to_loss", monkeypatch)
    monkeypatch.setattr(ttl, "prepared", never)
    assert bench_error(ttl, monkeypatch, capsys, "--target-loss", "3", "--preset", "nope").startswith(
        "time_to_loss.py: error: unknown model preset 'nope'")
    assert bench_error(ttl, monkeypatch, capsys, "--target-loss", "3", "--data", str(tmp_path / "none"), "--device", "cpu").startswith(
        f"time_to_loss.py: error: no tokenizer.json in {tmp_path / 'none'}")

    spec = bench_module("speculative", monkeypatch)
    assert bench_error(spec, monkeypatch, capsys, str(tmp_path / "none")).startswith(
        f"speculative.py: error: checkpoint {tmp_path / 'none'} does not exist")

    study = bench_module("scaling_study", monkeypatch)
    monkeypatch.setattr(study, "study", never)
    assert bench_error(study, monkeypatch, capsys, "--grid", str(tmp_path / "none.yaml"), "--out", str(tmp_path)).startswith(
        f"scaling_study.py: error: grid file {tmp_path / 'none.yaml'} does not exist")

    decode = bench_module("decode", monkeypatch)
    monkeypatch.setattr(decode, "Transformer", never)
    assert bench_error(decode, monkeypatch, capsys, "--preset", "tiny", "--prompt-len", "60", "--new-tokens", "10",
                       "--device", "cpu") == ("decode.py: error: preset tiny has a context of 64 tokens (learned positions "
                                              "cannot grow) and this run needs 70 (--prompt-len 60 + --new-tokens 10); lower them\n")
    assert "--max-seq-len 8 is shorter" in bench_error(decode, monkeypatch, capsys, "--preset", "tiny", "--prompt-len", "8",
                                                         "--new-tokens", "4", "--max-seq-len", "8", "--device", "cpu")


def test_train_throughput_labels_the_eager_runner_as_it_ran_even_when_stopped(monkeypatch, capsys):
    """Seen in review: stopped before the eager runner's first round, its row read "impl": "eager",
    "compile": true (the --compile of the fast path); elsewhere it is lmforge-eager-plain, uncompiled."""
    train = bench_module("train_throughput", monkeypatch)
    monkeypatch.setattr(train, "compile_module", lambda fn, mode="default": fn)  # --compile's rows, without compiling
    timed, calls = train.Runner.timed, []

    def stopped_in_the_eager_runners_first_round(self, *a, **k):
        calls.append(1)
        if len(calls) == 2:  # lmforge's first round is done, the eager runner's is next
            raise train.Stopped
        return timed(self, *a, **k)
    monkeypatch.setattr(train.Runner, "timed", stopped_in_the_eager_runners_first_round)
    eager, ours = bench_rows(train, monkeypatch, capsys, "--preset", "tiny", "--vocab-size", "64", "--batch-size", "1",
                             "--seq-len", "8", "--steps", "2", "--warmup", "0", "--rounds", "2", "--device", "cpu",
                             "--threads", "1", "--compile", "--loss-check")
    assert (eager["impl"], eager["compile"], eager["compile_mode"]) == ("lmforge-eager-plain", False, None)
    assert eager["failed"] == "stopped before a timed round" and eager["stopped_early"]
    assert (ours["impl"], ours["compile"], ours["stopped_early"]) == ("lmforge", True, True)


def test_distributed_train_keeps_the_pythonpath_it_was_given(monkeypatch, tmp_path):
    import lmforge.data

    dist = bench_module("distributed_train", monkeypatch)
    monkeypatch.setattr(lmforge.data, "train_tokenizer", lambda *a, **k: None)
    monkeypatch.setattr(lmforge.data, "prepare", lambda *a, **k: None)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(["/tmp/site", "/elsewhere"]))
    seen = []

    def run(cmd, env, **kwargs):
        seen.append(env["PYTHONPATH"])
        raise SystemExit(0)
    monkeypatch.setattr(dist.subprocess, "run", run)
    monkeypatch.setattr(sys, "argv", ["distributed_train.py", "--nprocs", "1"])
    with pytest.raises(SystemExit):
        dist.main()
    assert seen == [os.pathsep.join([str(ROOT / "src"), "/tmp/site", "/elsewhere"])]


FAKE_PYTHON = """#!/bin/bash
# python's stand-in: one JSON line naming the command; decode.py in the engine's own capture fails as a capture error would
echo "{\\"args\\": \\"$*\\"}"
case "$*" in *decode.py*"--graphs capture"*) echo "RuntimeError: capture failed" >&2; exit 1;; esac
"""


@pytest.mark.slow
def test_run_sh_quick_falls_back_to_torch_compiles_graphs_and_keeps_within_its_caps(tmp_path):
    run_sh = ROOT / "bench" / "gpu" / "run.sh"
    assert subprocess.run(["bash", "-n", str(run_sh)]).returncode == 0
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    env = {**os.environ, "PY": str(fake), "OUT": str(tmp_path / "out")}
    proc = subprocess.run(["bash", str(run_sh), "quick"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    rows = [json.loads(line)["args"] for line in proc.stdout.splitlines() if line.startswith('{"args"')][1:]  # after torch's version
    assert [r.split()[0] for r in rows] == ["bench/train_throughput.py"] + ["bench/decode.py"] * 3 + ["bench/train_throughput.py"]
    assert "--compare-hf --loss-check" in rows[0] and "--fp8" in rows[4] and "--steps 60" in rows[4]
    # batch 1 in the engine's capture fails: batch 1 again and batch 32 in torch.compile's graphs
    assert [(r.split("--batch ")[1].split()[0], r.split("--graphs ")[1]) for r in rows[1:4]] == [("1", "capture"), ("1", "trees"), ("32", "trees")]
    decode = [json.loads(line)["args"] for line in (tmp_path / "out" / "decode.jsonl").read_text().splitlines()]
    assert len(decode) == 3 and "capture failed" in (tmp_path / "out" / "decode.err").read_text()
