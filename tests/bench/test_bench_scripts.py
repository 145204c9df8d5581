"""The benchmark scripts run end to end at toy sizes and print the JSON lines they promise."""

import json
import os
import signal
import subprocess
import sys

import pytest

from conftest import ROOT, bench_module, bench_rows

pytestmark = pytest.mark.slow


def json_lines(stdout: str) -> list[dict]:
    """Every line of a bench's stdout, as strict JSON: bench/gpu/run.sh keeps stdout as NAME.jsonl, so
    a progress line there, or a NaN (which json.dumps writes and JSON readers refuse), breaks it."""
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")
    return [json.loads(line, parse_constant=refuse) for line in stdout.splitlines()]


def run_bench(*args: str) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json_lines(out.stdout)


def test_train_throughput_compares_with_transformers_and_the_eager_path(data_dir):
    pytest.importorskip("transformers")
    rows = run_bench("bench/train_throughput.py", "--preset", "tiny", "--vocab-size", "256", "--batch-size", "2",
                     "--steps", "2", "--warmup", "1", "--rounds", "2", "--device", "cpu", "--threads", "1",
                     "--chunked-loss", "50", "--loss-check", "--compare-hf", "--data", str(data_dir))
    ours, eager, hf, ratio = rows
    assert (ours["impl"], eager["impl"], hf["impl"], ratio["what"]) == ("lmforge", "lmforge-eager-plain", "transformers", "train_throughput_ratio")
    assert ours["tokens_per_s"] > 0 and set(ours["breakdown_ms"]) == {"data", "forward_backward", "optimizer"}
    assert ours["loss_vs_eager"]["rel_diff"] < 1e-5  # fp32: the chunked loss is the plain one
    assert ratio["lmforge_over_transformers"] > 0 and ours["params"] == hf["params"]


def test_time_to_loss_races_both_recipes(data_dir):
    rows = run_bench("bench/time_to_loss.py", "--data", str(data_dir), "--preset", "tiny", "--target-loss", "6.0",
                     "--max-steps", "40", "--batch-size", "4", "--lr", "1e-2", "--eval-interval", "10",
                     "--eval-batches", "2", "--device", "cpu", "--threads", "1")
    gpt2, fastest, ratio = rows
    assert (gpt2["recipe"], gpt2["optim"], fastest["recipe"], fastest["optim"]) == ("gpt2", "adamw", "fastest", "muon")
    assert gpt2["reached"] and fastest["reached"] and fastest["val_loss"] <= 6.0
    assert ratio["fastest_over_gpt2"] == pytest.approx(fastest["seconds"] / gpt2["seconds"], rel=0.05)
    assert ratio["requested_target_reached"] and ratio["target_loss"] == 6.0


def test_time_to_loss_compares_at_the_loss_both_reached_when_the_target_is_too_low(data_dir):
    gpt2, fastest, ratio = run_bench("bench/time_to_loss.py", "--data", str(data_dir), "--preset", "tiny", "--target-loss", "0.5",
                                     "--max-steps", "20", "--batch-size", "4", "--lr", "1e-2", "--eval-interval", "10",
                                     "--eval-batches", "2", "--device", "cpu", "--threads", "1")
    assert not gpt2["reached"] and not fastest["reached"] and not ratio["requested_target_reached"]
    common = max(min(loss for _, _, loss in r["curve"]) for r in (gpt2, fastest))
    assert ratio["target_loss"] == common
    first = {r["recipe"]: next(t for _, t, loss in r["curve"] if loss <= common) for r in (gpt2, fastest)}
    assert ratio["seconds"] == first and ratio["fastest_over_gpt2"] == pytest.approx(first["fastest"] / first["gpt2"], rel=1e-2)


def test_time_to_loss_reads_the_books_not_the_folders_provenance_file(monkeypatch):
    ttl = bench_module("time_to_loss", monkeypatch)
    if not (ttl.DATA / "gutenberg" / "SOURCE.txt").is_file():
        pytest.skip("../shared/data is not present")
    books = sorted(p.name for p in (ttl.DATA / "gutenberg").glob("*.txt") if p.name != "SOURCE.txt")
    assert [p.name for p in ttl.corpus_files()] == books + ["tinystories_train_head.txt", "tinystories_valid_head.txt"]


def test_a_diverged_loss_is_written_null_and_the_ratio_compares_the_finite_losses(monkeypatch, capsys):
    """json.dumps writes a nan loss as NaN, which is not JSON; the time ratio's lowest common loss
    (min over the curve) took the nan or ran out of validations at it."""
    ttl, data = bench_module("time_to_loss", monkeypatch), bench_module("_data", monkeypatch)
    nan, inf = float("nan"), float("inf")
    data.print_row({"what": "x", "loss_first": nan, "loss_vs_eager": {"rel_diff": inf}, "curve": [[1, 0.5, nan], [2, 1.0, 4.0]], "ok": 1.5})
    assert json_lines(capsys.readouterr().out) == [
        {"what": "x", "loss_first": None, "loss_vs_eager": {"rel_diff": None}, "curve": [[1, 0.5, None], [2, 1.0, 4.0]], "ok": 1.5}]
    runs = {"gpt2": {"reached": False, "target_loss": 3.0, "curve": [[10, 1.0, nan], [20, 2.0, 5.0], [30, 3.0, nan]]},
            "fastest": {"reached": False, "target_loss": 3.0, "curve": [[10, 0.5, 6.0], [20, 1.0, 4.5]]}}
    assert ttl.ratio(runs, 3.0) == {"target_loss": 5.0, "requested_target_reached": False, "fastest_over_gpt2": 0.5,
                                    "seconds": {"gpt2": 2.0, "fastest": 1.0}}
    assert ttl.lowest({"curve": [[10, 1.0, nan]]}) is None  # diverged from the first validation on: no ratio


def test_decode_compares_with_transformers_on_the_same_weights_and_profiles_its_steps(tmp_path):
    pytest.importorskip("transformers")
    ours, hf, ratio, profile = run_bench("bench/decode.py", "--preset", "tiny", "--vocab-size", "256", "--batch", "2",
                                         "--prompt-len", "16", "--new-tokens", "8", "--device", "cpu", "--threads", "1",
                                         "--compare-hf", "--repeat", "2", "--profile", "5", "--trace", str(tmp_path / "trace.json"))
    assert profile["what"] == "lmforge engine profile" and profile["steps"] == 5
    # Eager on CPU: the operators of each step, the heaviest first. tiny has 2 blocks: 2 attentions and
    # 9 linear layers a step (qkv, proj, fc and proj in each block, then the head).
    calls = {t["name"]: t["calls_per_step"] for t in profile["top"]}
    assert calls.get("aten::scaled_dot_product_attention") == 2.0 and calls.get("aten::linear") == 9.0
    assert 0 < profile["host_ops_ms_per_step"] <= profile["profiled_wall_ms_per_step"] and 0 < profile["busy_share"] <= 1
    assert json.loads((tmp_path / "trace.json").read_text())["traceEvents"]
    assert (ours["what"], hf["what"], hf["cache"]) == ("lmforge engine", "transformers generate", "dynamic")
    for row in (ours, hf):
        assert row["tokens_per_s"] > 0 and row["ttft_ms"] > 0 and row["ms_per_step"] > 0 and row["peak_memory_gb"] > 0
    assert ours["first_step_ms"] > 0 and hf["compiled"] is None  # eager transformers
    assert len(ratio["ratios"]) == 2 and ratio["ratio"] > 0
    assert ratio["sequences_identical_to_transformers"] == "2/2"  # fp32 greedy on the same weights


def test_serve_load_serves_concurrent_clients_as_it_serves_them_alone(trained_run):
    alone, together, speedup = run_bench("bench/serve_load.py", str(trained_run.checkpoint), "--clients", "4", "--max-tokens", "4",
                                         "--max-batch", "4", "--threads", "1")
    assert (alone["clients"], together["clients"]) == (4, 4)
    assert alone["tokens"] == together["tokens"] == 16
    assert speedup["identical_outputs"] == "4/4" and speedup["ratio"] > 0


def test_a_failing_comparison_is_reported_and_the_own_row_still_comes_out(monkeypatch, capsys):
    """On a first GPU run transformers' side may break (its compile on another version): the
    lmforge row must survive it, with the failure in a line of its own."""
    pytest.importorskip("transformers")
    train = bench_module("train_throughput", monkeypatch)
    timed = train.Runner.timed

    def breaks_for_transformers(self, *a, **k):
        if self.name != "lmforge":
            raise RuntimeError("boom")
        return timed(self, *a, **k)
    monkeypatch.setattr(train.Runner, "timed", breaks_for_transformers)
    failed, ours = bench_rows(train, monkeypatch, capsys, "--preset", "tiny", "--vocab-size", "256", "--batch-size", "2",
                              "--steps", "2", "--warmup", "1", "--rounds", "1", "--device", "cpu", "--threads", "1", "--compare-hf")
    assert (failed["impl"], failed["failed"]) == ("transformers", "RuntimeError: boom")
    assert ours["impl"] == "lmforge" and ours["tokens_per_s"] > 0

    decode = bench_module("decode", monkeypatch)
    monkeypatch.setattr(decode, "run_hf", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    ours, failed = bench_rows(decode, monkeypatch, capsys, "--preset", "tiny", "--vocab-size", "256", "--prompt-len", "8",
                              "--new-tokens", "4", "--device", "cpu", "--threads", "1", "--compare-hf", "--repeat", "2")
    assert ours["what"] == "lmforge engine" and ours["tokens_per_s"] > 0
    assert (failed["what"], failed["failed"]) == ("transformers generate", "RuntimeError: boom")


def test_sampling_bench_times_both_ways_and_they_keep_the_same_tokens(trained_run):
    rows = run_bench("bench/sampling.py", "--batch", "4", "--vocab", "3000", "--repeat", "2", "--device", "cpu")
    rows += run_bench("bench/sampling.py", "--checkpoint", str(trained_run.checkpoint), "--batch", "8", "--repeat", "2", "--device", "cpu")
    assert len(rows) == 10 and {r["logits"] for r in rows} == {"random", "checkpoint"}
    assert all(r["ms"] > 0 and r["reference_ms"] > 0 for r in rows)
    assert all(r["same_kept_tokens"] in (True, None) for r in rows) and rows[0]["same_kept_tokens"] is None


def test_train_throughput_stopped_by_sigterm_reports_the_rounds_it_finished(monkeypatch, capsys):
    """`timeout` ends a bench with SIGTERM: the rounds done by then are still reported."""
    pytest.importorskip("transformers")
    train = bench_module("train_throughput", monkeypatch)
    timed, calls = train.Runner.timed, []

    def stopped_in_the_second_round(self, *a, **k):
        calls.append(self.name)
        if len(calls) == 4:  # lmforge's second round: every runner has finished one
            raise train.Stopped  # what the SIGTERM handler raises
        return timed(self, *a, **k)
    monkeypatch.setattr(train.Runner, "timed", stopped_in_the_second_round)
    ours, eager, hf, ratio = bench_rows(train, monkeypatch, capsys, "--preset", "tiny", "--vocab-size", "256", "--batch-size", "2",
                                        "--steps", "4", "--warmup", "1", "--rounds", "2", "--device", "cpu", "--threads", "1",
                                        "--compare-hf", "--loss-check")
    assert ours["stopped_early"] and len(ours["ms_per_step_rounds"]) == 1 and ours["breakdown_ms"] is None
    assert ours["loss_vs_eager"]["steps"] == 3 and ours["loss_vs_eager"]["rel_diff"] < 1e-5  # 1 warm-up + 2 timed steps
    assert eager["impl"] == "lmforge-eager-plain" and hf["impl"] == "transformers" and ratio["lmforge_over_transformers"] > 0
    assert ratio["stopped_early"]  # a ratio of 1 of 2 rounds, marked as the rows it compares
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL

    # decode.py: stopped in transformers' second turn, it reports the one whole turn of each side.
    decode = bench_module("decode", monkeypatch)
    run_hf, hf_turns = decode.run_hf, []

    def stopped_in_the_second_turn(*a, **k):
        hf_turns.append(1)
        if len(hf_turns) == 2:
            raise decode.Stopped
        return run_hf(*a, **k)
    monkeypatch.setattr(decode, "run_hf", stopped_in_the_second_turn)
    ours, theirs, ratio = bench_rows(decode, monkeypatch, capsys, "--preset", "tiny", "--vocab-size", "256", "--prompt-len", "8",
                                     "--new-tokens", "4", "--device", "cpu", "--threads", "1", "--compare-hf", "--repeat", "3")
    assert ours["stopped_early"] and theirs["what"] == "transformers generate" and len(ratio["ratios"]) == 1
    assert ours["repeat"] == theirs["repeat"] == 1  # the turns done, not --repeat's 3


def test_prefix_cache_bench_reuses_prefixes_and_keeps_the_outputs(trained_run, tmp_path):
    from conftest import varied_transformer

    from lmforge.checkpoint.store import save_checkpoint
    from lmforge.infer import load

    tok = load(trained_run.out).tokenizer
    tok.chat_template = ("{% for m in messages %}<|cls|>{{ m['role'] }}\n{{ m['content'] }}<|endoftext|>\n{% endfor %}"
                         "{% if add_generation_prompt %}<|cls|>assistant\n{% endif %}")
    save_checkpoint(tmp_path / "chat", varied_transformer(0, vocab_size=tok.vocab_size, context_length=1024), tok)
    rows = run_bench("bench/prefix_cache.py", str(tmp_path / "chat"), "--turns", "3", "--clients", "3", "--system-lines", "4",
                     "--max-tokens", "6", "--repeat", "1", "--threads", "1")
    chat_off, chat_on, chat_ratio, shared_off, shared_on, shared_ratio = rows
    assert [r["prefix_cache"] for r in rows if "prefix_cache" in r] == [False, True, False, True]
    assert chat_off["reused_tokens"] == shared_off["reused_tokens"] == 0
    assert chat_on["prompt_tokens"] == chat_off["prompt_tokens"] and chat_on["reused_tokens"] > chat_on["prompt_tokens"] // 3
    assert shared_on["reused_tokens"] >= 2 * shared_on["system_tokens"]  # two of three requests copy the system message
    assert chat_ratio["identical_outputs"] and shared_ratio["identical_outputs"] and chat_ratio["ttft_ratio"] > 0
    for row in (chat_off, chat_on, shared_off, shared_on):  # one decode step inside the TTFT, and its estimate without it
        assert row["decode_step_ms"] > 0 and row["ttft_less_decode_ms"] <= row["ttft_ms"]
    assert "ttft_less_decode_ratio" in chat_ratio and "ttft_less_decode_ratio" in shared_ratio


def test_speculative_bench_gives_the_same_tokens_four_ways(trained_run, tmp_path):
    pytest.importorskip("transformers")
    from conftest import SHARED_DATA, varied_transformer

    from lmforge.checkpoint.store import save_checkpoint
    from lmforge.infer import load

    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not present")
    tok = load(trained_run.out).tokenizer
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    save_checkpoint(tmp_path / "chat", varied_transformer(0, vocab_size=tok.vocab_size, context_length=2048), tok)
    rows = run_bench("bench/speculative.py", str(tmp_path / "chat"), "--docs", "2", "--max-new-tokens", "12", "--speculate", "4",
                     "--repeat", "1", "--threads", "1")
    plain, fast, hf, hf_lookup, ratio = rows
    assert [r["what"] for r in rows[:4]] == ["lmforge", "lmforge speculative", "transformers", "transformers prompt lookup"]
    assert plain["tokens"] == fast["tokens"] == hf["tokens"] == hf_lookup["tokens"] > 0
    assert fast["drafted"] >= fast["accepted"] and plain["drafted"] == 0
    assert ratio["identical_outputs"] == {"lmforge": 2, "lmforge speculative": 2, "transformers": 2, "transformers prompt lookup": 2}
