"""`lmforge serve` as a user starts it: a subprocess answering on loopback."""

import os
import shutil
import socket
import subprocess
import sys
import time

import httpx
import pytest

from lmforge.cli.main import main

SRC = os.path.join(os.path.dirname(__file__), "..", "..", "src")


@pytest.mark.slow
def test_serve_verb_answers_and_guards_with_a_key(trained_run):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": os.path.abspath(SRC)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "lmforge", "serve", str(trained_run.out), "--port", str(port), "--api-key", "k",
         "--device", "cpu", "--max-batch", "4", "--max-seq-len", "40"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        assert httpx.get(url + "/v1/models").status_code == 401
        r = httpx.post(url + "/v1/completions", headers={"Authorization": "Bearer k"},
                       json={"prompt": "ROMEO:", "max_tokens": 5, "temperature": 0})
        assert r.status_code == 200 and r.json()["model"] == "tiny" and r.json()["usage"]["completion_tokens"] >= 1
        card = httpx.get(url + "/v1/models", headers={"Authorization": "Bearer k"}).json()["data"][0]
        assert card["max_model_len"] == 40
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    assert "KV cache: 4 sequences x 40 tokens" in proc.stdout.read().decode()


def test_serve_missing_checkpoint_is_one_line(capsys, tmp_path):
    assert main(["serve", str(tmp_path / "nope"), "--port", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("lmforge: error: ") and "Traceback" not in "\n".join(err)


@pytest.mark.parametrize("flag, n, says", [("--max-queue", "0", "--max-queue must be >= 1"),
                                           ("--max-queue", "-3", "--max-queue must be >= 1"),
                                           ("--writes-per-step", "-1", "--writes-per-step must be >= 0")])
def test_serve_refuses_a_queue_that_holds_nothing_and_negative_writes(capsys, tmp_path, flag, n, says):
    """--max-queue 0 would answer every request 429: refused in one line, before anything loads; a negative
    --writes-per-step was taken (seen in review)."""
    assert main(["serve", str(tmp_path / "nope"), "--port", "0", flag, n]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and says in err[0]


def test_the_model_id_is_the_run_or_the_checkpoint_folder(trained_run, tmp_path):
    """A run's step-* checkpoint is served as the run's name; any other checkpoint folder as its own
    (an imported /tmp/smollm2 is "smollm2", not "tmp")."""
    from fastapi.testclient import TestClient

    from lmforge.checkpoint import resolve_checkpoint
    from lmforge.serve import create_app

    step = resolve_checkpoint(trained_run.out)
    assert step.name.startswith("step-")
    alone = tmp_path / "smollm2"
    shutil.copytree(step, alone)
    for path, name in ((trained_run.out, "tiny"), (step, "tiny"), (alone, "smollm2")):
        app = create_app(path, device="cpu", max_batch=1)
        try:
            assert [m["id"] for m in TestClient(app).get("/v1/models").json()["data"]] == [name]
        finally:
            app.state.runner.close()
