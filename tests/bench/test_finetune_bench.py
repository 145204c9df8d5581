"""bench/finetune_tasks.py runs a row of the fine-tuning table end to end (--smoke) and prints its JSON line."""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, SHARED_DATA

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is not present")]


def test_finetune_tasks_smoke_row_writes_under_out_and_prints_its_commands(trained_run, tmp_path):
    out = tmp_path / "bench-runs"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", "LMFORGE_SHARED_DATA": str(SHARED_DATA)}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "finetune_tasks.py"), "--base", str(trained_run.out), "--smoke",
         "--rows", "sst2-lora", "--out", str(out), "--device", "cpu"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    [row] = [json.loads(line) for line in proc.stdout.splitlines()]  # stdout is JSON lines only (the loop's log: stderr)
    assert (row["what"], row["row"], row["device"], row["smoke"]) == ("finetune_tasks", "sst2-lora", "cpu", True)
    assert 0 <= row["accuracy"] <= 100 and row["examples"] == 8  # --smoke scores 8 examples
    assert 0 < row["trainable_params"] and row["train_seconds"] > 0
    finetune_cmd, eval_cmd = row["commands"]
    assert finetune_cmd.startswith(f"lmforge finetune {trained_run.out} --task classify") and "--lora.r 8" in finetune_cmd
    assert f"--out {out / 'sst2-lora'}" in finetune_cmd and eval_cmd.startswith(f"lmforge eval {row['checkpoint']} --task classify")
    assert row["checkpoint"].startswith(str(out)) and (out / "sst2-lora" / "metrics.jsonl").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench-runs"]  # nothing written elsewhere (no ./runs)
