"""The command line: the whole path through `main()`, `--json`, presets, and one-line errors."""

import json

import pytest

from lmforge.cli.main import main, parse


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def fails_with(capsys, match, *argv):
    code, out, err = run(capsys, *argv)
    lines = [l for l in err.splitlines() if l.strip()]
    assert code == 2, (out, err)
    assert lines and lines[-1].startswith("lmforge: error: ") and match in lines[-1], err
    assert "Traceback" not in err
    return lines[-1]


def test_whole_path_through_the_cli(capsys, tmp_path, corpus_file):
    code, out, _ = run(capsys, "tokenizer", "train", corpus_file, "--vocab-size", 400, "--out", tmp_path / "tok", "--json")
    assert code == 0 and json.loads(out.splitlines()[-1])["vocab_size"] == 400
    code, out, _ = run(capsys, "prepare", corpus_file, "--tokenizer", tmp_path / "tok", "--out", tmp_path / "data", "--json")
    assert code == 0 and json.loads(out.splitlines()[-1])["splits"]["val"]["tokens"] > 1000
    code, out, _ = run(
        capsys, "pretrain", "--data", tmp_path / "data", "--out", tmp_path / "run", "--model.preset", "tiny",
        "--model.n_layer", 1, "--train.max_steps", 6, "--train.batch_size", 4, "--train.eval_interval", 3,
        "--train.device", "cpu", "--json",
    )
    result = json.loads(out.splitlines()[-1])
    assert code == 0 and result["step"] == 6 and result["val_bpb"] > 0
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    config = json.loads((tmp_path / "run" / "step-000006" / "config.json").read_text())["model"]
    assert (config["n_layer"], config["n_embd"], config["vocab_size"]) == (1, 64, 400)  # preset, then override

    code, out, _ = run(capsys, "generate", tmp_path / "run", "--prompt", "ROMEO:", "--max-new-tokens", 20, "--seed", 1)
    assert code == 0 and len(out) > 1
    code, out2, _ = run(capsys, "generate", tmp_path / "run", "--prompt", "ROMEO:", "--max_new_tokens", 20, "--seed", 1, "--json")
    assert code == 0 and json.loads(out2.splitlines()[-1])["text"] + "\n" == out
    code, out, _ = run(capsys, "eval", tmp_path / "run", "--data", tmp_path / "data", "--json")
    assert code == 0 and set(json.loads(out.splitlines()[-1])) >= {"loss", "perplexity", "bpb"}


def test_yaml_config_with_preset_and_overrides(tmp_path):
    (tmp_path / "c.yaml").write_text("model:\n  preset: tiny\n  n_embd: 96\ntrain:\n  max_steps: 7\n")
    ns = parse(["pretrain", "--config", str(tmp_path / "c.yaml"), "--data", "d", "--out", "o", "--model.n_head", "8"])
    m = ns.pretrain.model
    assert (m.preset, m.n_layer, m.n_embd, m.n_head, m.context_length) == ("tiny", 2, 96, 8, 64)
    assert ns.pretrain.train.max_steps == 7


def test_config_keys_take_dashes_as_other_options_do():
    ns = parse(["pretrain", "--data", "d", "--out", "o", "--train.skip-nonfinite", "true", "--train.max-steps=9",
                "--model.preset", "tiny", "--model.n-kv-head", "2"])
    assert (ns.pretrain.train.skip_nonfinite, ns.pretrain.train.max_steps, ns.pretrain.model.n_kv_head) == (True, 9, 2)


def test_unknown_config_key(capsys, tmp_path):
    fails_with(capsys, "--model.n_layers", "pretrain", "--data", "d", "--out", "o", "--model.n_layers", 3)
    fails_with(capsys, "--train.max_step", "pretrain", "--data", "d", "--out", "o", "--train.max_step", 3)  # no prefixes
    (tmp_path / "c.yaml").write_text("train:\n  max_stepz: 7\n")
    fails_with(capsys, "max_stepz", "pretrain", "--config", tmp_path / "c.yaml", "--data", "d", "--out", "o")


def test_bad_values(capsys, data_dir, tmp_path):
    fails_with(capsys, "unknown model preset", "pretrain", "--data", data_dir, "--out", tmp_path / "r", "--model.preset", "gpt9")
    fails_with(capsys, "divisible", "pretrain", "--data", data_dir, "--out", tmp_path / "r", "--model.n_head", 5)
    fails_with(capsys, "not a prepared data directory", "pretrain", "--data", tmp_path / "none", "--out", tmp_path / "r")
    fails_with(capsys, "compile_mode", "pretrain", "--data", data_dir, "--out", tmp_path / "r", "--train.compile_mode", "fastest")
    assert not (tmp_path / "r").exists()


def test_corpus_errors(capsys, tmp_path):
    fails_with(capsys, "does not exist", "tokenizer", "train", tmp_path / "missing.txt", "--out", tmp_path / "tok")
    (tmp_path / "empty.txt").write_text("")
    fails_with(capsys, "empty", "tokenizer", "train", tmp_path / "empty.txt", "--out", tmp_path / "tok")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    fails_with(capsys, "latin1.txt", "tokenizer", "train", tmp_path / "latin1.txt", "--out", tmp_path / "tok")
    (tmp_path / "ok.txt").write_text("hello world " * 50)
    fails_with(capsys, "vocab", "tokenizer", "train", tmp_path / "ok.txt", "--vocab-size", 100, "--out", tmp_path / "tok")
    assert not (tmp_path / "tok").exists()


def test_generation_errors(capsys, trained_run, tmp_path):
    fails_with(capsys, "longer than the model's context", "generate", trained_run.out, "--prompt", "word " * 200)
    fails_with(capsys, "does not exist", "generate", tmp_path / "nope", "--prompt", "hi")
    fails_with(capsys, "top_p", "generate", trained_run.out, "--top-p", 0)
    fails_with(capsys, "dtype", "generate", trained_run.out, "--dtype", "fp16")


@pytest.mark.parametrize("option", [("--top-p", 0, "top_p must be in (0, 1], got 0.0"),
                                    ("--temperature", -1, "temperature must be >= 0, got -1.0"),
                                    ("--seed", -5, "seed must be in [0, 2**64), got -5")])
def test_chat_refuses_bad_sampling_once_before_the_first_turn(capsys, monkeypatch, trained_run, tmp_path, option):
    """Not an error printed after every message with exit status 0."""
    import io
    import shutil

    from lmforge.infer import load

    ckpt = tmp_path / "chat"
    shutil.copytree(load(trained_run.out, device="cpu").path, ckpt)
    tok = load(ckpt, device="cpu").tokenizer
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    tok.save(ckpt)
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\nhello\n"))
    flag, value, message = option
    fails_with(capsys, message, "chat", ckpt, flag, value, "--max-new-tokens", 2)


@pytest.mark.parametrize(
    "verb",
    [["demo"], ["tokenizer", "train"], ["prepare"], ["pretrain"], ["generate"], ["chat"], ["eval"], ["import", "hf"],
     ["import", "gguf"], ["export", "hf"], ["scaling", "fit"], ["scaling", "plan"], ["finetune"], ["merge-lora"], ["predict"]],
)
def test_every_verb_has_help(capsys, verb):
    with pytest.raises(SystemExit) as e:
        main([*verb, "--help"])
    assert e.value.code == 0 and "usage" in capsys.readouterr().out


def test_export_and_import_hf(capsys, trained_run, tmp_path):
    code, out, _ = run(capsys, "export", "hf", trained_run.out, "--out", tmp_path / "hf", "--json")
    assert code == 0 and json.loads(out.splitlines()[-1])["out"] == str(tmp_path / "hf")
    code, out, _ = run(capsys, "import", "hf", tmp_path / "hf", "--out", tmp_path / "back")
    assert code == 0 and (tmp_path / "back" / "model.safetensors").exists()
    fails_with(capsys, "config.json is missing", "import", "hf", tmp_path / "nothing", "--out", tmp_path / "x")


def test_scaling_plan_and_fit(capsys, tmp_path):
    code, out, _ = run(capsys, "scaling", "plan", "--flops", "5.76e23", "--json")
    result = json.loads(out.splitlines()[-1])
    assert code == 0 and {"params", "tokens", "flops", "loss", "tokens_per_param", "gpu_hours"} <= set(result)
    fails_with(capsys, "too small for any model", "scaling", "plan", "--flops", "1e6")
    code, out, _ = run(capsys, "scaling", "plan", "--flops", "1e300")  # amounts past a trillion in powers of ten
    assert code == 0 and "GPU-hours" in out and max(len(w) for w in out.split()) < 20, out

    # A study generated from a known law: the fit finds its exponents again.
    import numpy as np

    from lmforge.scaling import ParametricLaw

    law = ParametricLaw(E=1.8, A=400.0, B=1200.0, alpha=0.34, beta=0.28)
    rng = np.random.default_rng(0)
    rows = [
        {"params": n, "tokens": d, "loss": float(law.loss(n, d)) * (1 + 0.003 * rng.normal())}
        for n in (1e6, 3e6, 1e7, 3e7, 1e8, 3e8) for d in (1e8, 3e8, 1e9, 3e9, 1e10)
    ]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, out, _ = run(capsys, "scaling", "fit", tmp_path, "--approaches", "approach3", "--bootstrap", "20", "--json")
    fitted = json.loads(out.splitlines()[-1])["approach3"]["exponents"]
    assert code == 0 and abs(fitted["alpha"] - 0.34) < 0.34 * 0.05 and abs(fitted["beta"] - 0.28) < 0.28 * 0.05
    assert (tmp_path / "fit.json").exists() and (tmp_path / "fitted_vs_observed.png").exists()
    code, out, _ = run(capsys, "scaling", "plan", "--params", "1e8", "--law", tmp_path / "fit.json", "--json")
    assert code == 0 and json.loads(out.splitlines()[-1])["params"] == 1e8
    (tmp_path / "few").mkdir()
    (tmp_path / "few" / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:3]))
    fails_with(capsys, "needs >= 6 runs", "scaling", "fit", tmp_path / "few", "--approaches", "approach3")


def test_finetune_predict_eval_and_merge_through_the_cli(capsys, trained_run, tmp_path):
    data = tmp_path / "train.tsv"
    data.write_text("sentence\tlabel\n" + "".join(f"{w} {i}\t{int(w == 'good')}\n" for i in range(20) for w in ("good", "bad")))
    code, out, _ = run(capsys, "finetune", trained_run.out, "--task", "classify", "--data", data, "--out", tmp_path / "ft",
                       "--lora.r", 4, "--lora.targets", "all-linear", "--train.max_steps", 30, "--train.lr", 1e-2,
                       "--train.device", "cpu", "--train.tensorboard", "false", "--json")
    result = json.loads(out.splitlines()[-1])
    assert code == 0 and result["step"] == 30 and result["trainable_params"] < result["params"] / 2
    code, out, _ = run(capsys, "eval", result["checkpoint"], "--task", "classify", "--data", data, "--json")
    scores = json.loads(out.splitlines()[-1])
    assert code == 0 and scores["examples"] == 40 and scores["accuracy"] == 100.0  # "good" vs "bad" is learnt
    code, out, _ = run(capsys, "eval", result["checkpoint"], "--task", "classify", "--data", data, "--dtype", "bfloat16", "--json")
    assert code == 0 and json.loads(out.splitlines()[-1])["accuracy"] == 100.0
    code, _, _ = run(capsys, "merge-lora", result["checkpoint"], "--out", tmp_path / "merged")
    assert code == 0
    code, _, _ = run(capsys, "predict", tmp_path / "merged", "--data", data, "--out", tmp_path / "pred.jsonl")
    rows = [json.loads(line) for line in (tmp_path / "pred.jsonl").read_text().splitlines()]
    assert code == 0 and len(rows) == 40 and [r["label"] for r in rows[:2]] == ["1", "0"]
    fails_with(capsys, "belongs to task evaluation", "eval", tmp_path / "merged", "--data", data, "--limit", 3)
    fails_with(capsys, "--task", "finetune", trained_run.out, "--task", "nope", "--data", data, "--out", tmp_path / "x")
    fails_with(capsys, "no LoRA adapters", "merge-lora", tmp_path / "merged", "--out", tmp_path / "m2")


def test_serve_binds_to_localhost_by_default_and_checks_its_port(capsys, monkeypatch, trained_run, tmp_path):
    import lmforge.serve

    calls = []
    monkeypatch.setattr(lmforge.serve, "serve", lambda checkpoint, **kw: calls.append((checkpoint, kw)))
    assert run(capsys, "serve", trained_run.out)[0] == 0
    assert calls[0][1]["host"] == "127.0.0.1" and calls[0][1]["port"] == 8000 and calls[0][1]["api_key"] is None
    assert run(capsys, "serve", trained_run.out, "--host", "0.0.0.0", "--api-key", "k")[0] == 0
    assert (calls[1][1]["host"], calls[1][1]["api_key"]) == ("0.0.0.0", "k")
    fails_with(capsys, "--port must be in [0, 65535]", "serve", trained_run.out, "--port", 70000)
    monkeypatch.undo()  # the real serve checks the checkpoint before it binds a port
    fails_with(capsys, "does not exist", "serve", tmp_path / "nope")


@pytest.mark.slow
def test_a_reader_that_goes_away_stops_the_output_quietly(trained_run):
    """`lmforge generate ... | head -1`: once the pipe's reader has gone, no traceback, status 141 as for SIGPIPE."""
    import os
    import subprocess
    import sys

    from conftest import ROOT

    proc = subprocess.Popen([sys.executable, "-m", "lmforge", "generate", str(trained_run.out), "--prompt", "ROMEO:",
                             "--max-new-tokens", "20"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    proc.stdout.close()  # long before the process, still importing, writes anything
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141, err
    assert "Traceback" not in err and "Error" not in err, err


def test_outputs_in_the_way(capsys, trained_run, corpus_file, tokenizer_dir, data_dir, tmp_path):
    (tmp_path / "file.txt").write_text("keep me")
    fails_with(capsys, "file.txt is a file", "tokenizer", "train", corpus_file, "--vocab-size", 300, "--out", tmp_path / "file.txt")
    fails_with(capsys, "file.txt is a file", "tokenizer", "train", corpus_file, "--out", tmp_path / "file.txt" / "tok")
    fails_with(capsys, "file.txt is a file", "pretrain", "--data", data_dir, "--out", tmp_path / "file.txt", "--model.preset", "tiny",
               "--train.device", "cpu")
    # Replacing a directory that is not an earlier output of the verb would lose the user's files.
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    assert run(capsys, "export", "hf", trained_run.out, "--out", tmp_path / "hf")[0] == 0
    fails_with(capsys, "notes exists and is not a checkpoint directory", "import", "hf", tmp_path / "hf", "--out", tmp_path / "notes")
    fails_with(capsys, "notes exists and is not a model directory", "export", "hf", trained_run.out, "--out", tmp_path / "notes")
    (tmp_path / "a.txt").write_text("one\ntwo\n")
    fails_with(capsys, "notes exists and is not a prepared data directory", "prepare", tmp_path / "a.txt", "--target",
               tmp_path / "a.txt", "--tokenizer", tokenizer_dir, "--out", tmp_path / "notes")
    fails_with(capsys, "is a directory; pass the path of the JSONL file", "predict", trained_run.out, "--data", tmp_path / "a.txt",
               "--out", tmp_path / "notes")
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me" and (tmp_path / "file.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "file.txt", "hf", "notes"]


def test_numbers_out_of_range(capsys, trained_run, corpus_file, tmp_path):
    fails_with(capsys, "min_frequency must be >= 0", "tokenizer", "train", corpus_file, "--min-frequency", -1, "--out", tmp_path / "t")
    fails_with(capsys, "batch_size must be >= 1, got 0", "eval", trained_run.out, "--data", corpus_file, "--batch-size", 0)
    fails_with(capsys, "batch_size must be >= 1, got -2", "eval", trained_run.out, "--data", corpus_file, "--batch-size", -2)
    fails_with(capsys, "--max-new-tokens must be >= 1, got 0", "generate", trained_run.out, "--max-new-tokens", 0)
    fails_with(capsys, "--max-new-tokens must be >= 1, got -1", "generate", trained_run.out, "--max-new-tokens", -1)
    fails_with(capsys, "--max-new-tokens must be >= 1, got 0", "chat", trained_run.out, "--max-new-tokens", 0)
    fails_with(capsys, "--speculate must be >= 0, got -1", "chat", trained_run.out, "--speculate", -1)
    fails_with(capsys, "speculate must be >= 0 draft tokens, got -1", "serve", trained_run.out, "--port", 0, "--speculate", -1)
    fails_with(capsys, "--doc-stride must be >= 0", "finetune", trained_run.out, "--task", "qa", "--data", tmp_path / "q.json",
               "--out", tmp_path / "ft", "--doc-stride", -1)
    assert not (tmp_path / "t").exists() and not (tmp_path / "ft").exists()


def test_task_data_mistakes_are_one_line(capsys, trained_run, tokenizer_dir, tmp_path):
    src, tgt = tmp_path / "src.en", tmp_path / "tgt.de"
    src.write_text("a man rides\ntwo dogs play\n")
    tgt.write_text("ein Mann reitet\nzwei Hunde spielen\n")
    (tmp_path / "fake.txt.gz").write_bytes(b"not gzip\n")
    fails_with(capsys, f"{tmp_path / 'fake.txt.gz'} is not a valid gzip file", "prepare", src, "--target", tmp_path / "fake.txt.gz",
               "--tokenizer", tokenizer_dir, "--out", tmp_path / "p")
    (tmp_path / "adir").mkdir()
    fails_with(capsys, f"{tmp_path / 'adir'} is a directory", "prepare", src, "--target", tmp_path / "adir",
               "--tokenizer", tokenizer_dir, "--out", tmp_path / "p")
    # A source file without its --val-target: a line naming the option, not "invalid JSON".
    fails_with(capsys, "--val-target", "finetune", trained_run.out, "--task", "seq2seq", "--data", src, "--target", tgt,
               "--val", src, "--out", tmp_path / "ft", "--train.device", "cpu")
    # Parallel pairs are not token shards.
    assert run(capsys, "prepare", src, "--target", tgt, "--tokenizer", trained_run.checkpoint, "--out", tmp_path / "pairs")[0] == 0
    fails_with(capsys, "token shards", "eval", trained_run.out, "--data", tmp_path / "pairs")
    fails_with(capsys, "--max-new-tokens must be >= 1, got 0", "predict", trained_run.out, "--task", "seq2seq", "--data", src,
               "--out", tmp_path / "p.jsonl", "--max-new-tokens", 0)
    fails_with(capsys, "--split-articles 0.0 is out of range", "finetune", trained_run.out, "--task", "qa", "--data", src,
               "--out", tmp_path / "ft", "--split-articles", 0, "--train.device", "cpu")
    code, _, _ = run(capsys, "predict", trained_run.out, "--task", "seq2seq", "--data", src, "--out", tmp_path / "p.jsonl",
                     "--max-new-tokens", 2, "--device", "cpu")
    rows = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert code == 0 and [r["source"] for r in rows] == ["a man rides", "two dogs play"]
    assert not (tmp_path / "ft").exists()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_asked_for_on_a_cpu_machine_names_the_verbs_option(capsys, trained_run):
    fails_with(capsys, "use the cpu device (--device cpu", "generate", trained_run.out, "--device", "cuda")


def test_config_files_that_are_empty_or_binary(capsys, tmp_path):
    (tmp_path / "empty.yaml").write_text("")
    fails_with(capsys, "empty.yaml is empty", "pretrain", "--config", tmp_path / "empty.yaml", "--data", "d", "--out", "o")
    (tmp_path / "bin.yaml").write_bytes(b"\x80\x81train: 1")
    fails_with(capsys, "bin.yaml is not UTF-8 text", "pretrain", "--config", tmp_path / "bin.yaml", "--data", "d", "--out", "o")
    fails_with(capsys, "bin.yaml is not UTF-8 text", "finetune", "c", "--config=" + str(tmp_path / "bin.yaml"), "--task", "tag",
               "--data", "d", "--out", "o")


def test_serve_on_a_port_in_use_or_a_foreign_host(capsys, trained_run):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        fails_with(capsys, f"port {port} on 127.0.0.1 is already in use", "serve", trained_run.out, "--port", port)
    fails_with(capsys, "cannot listen on 192.0.2.1", "serve", trained_run.out, "--host", "192.0.2.1", "--port", 0)
    fails_with(capsys, "--threads must be >= 1", "serve", trained_run.out, "--threads", -1)


@pytest.mark.parametrize("verb, yaml, key", [
    (["pretrain", "--data", "d", "--out", "o"], "model:\n#  preset: tiny\ntrain:\n  max_steps: 1\n", "model"),
    (["pretrain", "--data", "d", "--out", "o"], "model: [1, 2]\n", "model"),
    (["pretrain", "--data", "d", "--out", "o"], "model: {preset: tiny}\ntrain: 5\n", "train"),
    (["finetune", "c", "--task", "tag", "--data", "d", "--out", "o"], "train:\n#  max_steps: 1\n", "train"),
    (["finetune", "c", "--task", "tag", "--data", "d", "--out", "o"], "lora: [8]\n", "lora"),
])
def test_a_config_group_that_is_not_a_mapping_is_one_line(capsys, tmp_path, verb, yaml, key):
    (tmp_path / "c.yaml").write_text(yaml)
    fails_with(capsys, f"`{key}` in --config must be a mapping", *verb, "--config", tmp_path / "c.yaml")


@pytest.mark.parametrize("verb, yaml, expected", [
    (["pretrain"], "data: 5\nout: o\n", '"data"'),  # the key, quoted: not "meta.json" or "--out"
    (["pretrain"], "data: [a, b]\nout: o\n", '"data"'),
    (["pretrain"], "data: d\nout: {x: 1}\n", '"out"'),
    (["pretrain"], "data: d\nout: o\nresume: maybe\n", "not boolean: maybe"),  # a flag takes a boolean only
    (["pretrain"], "data: d\nout: o\njson: 1\n", "not boolean: 1"),
    (["finetune", "c", "--task", "tag"], "data: d\nout: o\nfreeze_embeddings: sure\n", "not boolean: sure"),
    (["finetune", "c", "--task", "tag"], "data: d\nout: o\nlabels: [[1]]\n", '"labels"'),
    (["finetune", "--task", "tag"], "checkpoint: 5\ndata: d\nout: o\n", '"checkpoint"'),
])
def test_option_values_of_the_wrong_type_in_a_config_are_one_line(capsys, tmp_path, verb, yaml, expected):
    (tmp_path / "c.yaml").write_text(yaml)
    fails_with(capsys, expected, *verb, "--config", tmp_path / "c.yaml")


def test_flags_still_take_no_value_and_yaml_booleans(tmp_path):
    ns = parse(["pretrain", "--resume", "--data", "d", "--out", "o", "--json"])
    assert ns.pretrain.resume is True and ns.pretrain.json is True
    ns = parse(["finetune", "--json", "c", "--task", "tag", "--data", "d", "--out", "o", "--freeze-embeddings"])
    assert (ns.finetune.checkpoint, ns.finetune.json, ns.finetune.freeze_embeddings, ns.finetune.resume) == ("c", True, True, False)
    (tmp_path / "c.yaml").write_text("data: d\nout: o\nresume: true\n")
    assert parse(["pretrain", "--config", str(tmp_path / "c.yaml")]).pretrain.resume is True
    # A string option whose default is None keeps "null" as given: `--api-key null` is a key, not no key.
    assert parse(["serve", "ck", "--api-key", "null"]).serve.api_key == "null"
    assert parse(["serve", "ck"]).serve.api_key is None


def test_tokenizer_train_into_data_or_a_checkpoint_is_refused(capsys, trained_run, corpus_file, data_dir):
    before = (data_dir / "tokenizer.json").read_bytes(), (trained_run.checkpoint / "tokenizer.json").read_bytes()
    fails_with(capsys, "holds prepared data", "tokenizer", "train", corpus_file, "--vocab-size", 300, "--out", data_dir)
    fails_with(capsys, "holds a checkpoint", "tokenizer", "train", corpus_file, "--vocab-size", 300, "--out", trained_run.checkpoint)
    assert before == ((data_dir / "tokenizer.json").read_bytes(), (trained_run.checkpoint / "tokenizer.json").read_bytes())


def test_pretrain_into_its_data_then_prepare_again_loses_nothing(capsys, tmp_path, corpus_file, tokenizer_dir):
    assert run(capsys, "prepare", corpus_file, "--tokenizer", tokenizer_dir, "--out", tmp_path / "d")[0] == 0
    fails_with(capsys, "the data directory", "pretrain", "--data", tmp_path / "d", "--out", tmp_path / "d" / "run",
               "--model.preset", "tiny", "--train.device", "cpu")
    (tmp_path / "d" / "run").mkdir()  # e.g. a run written there by an older lmforge
    (tmp_path / "d" / "run" / "metrics.jsonl").write_text("{}\n")
    fails_with(capsys, "holds run, which `lmforge prepare` did not write", "prepare", corpus_file, "--tokenizer", tokenizer_dir,
               "--out", tmp_path / "d")
    src = tmp_path / "src.txt"
    src.write_text("a\nb\nc\n")
    fails_with(capsys, "holds run, which `lmforge prepare` did not write", "prepare", src, "--target", src,
               "--tokenizer", tokenizer_dir, "--out", tmp_path / "d")
    assert (tmp_path / "d" / "run" / "metrics.jsonl").exists()


def test_the_qa_score_hint_keeps_the_article_split(capsys, trained_run, tmp_path):
    """A fine-tune on the first articles of a SQuAD file is scored on the rest of the same file: the
    hint says so (a DEV_FILE placeholder would invite scoring on the training articles too)."""
    from conftest import SHARED_DATA

    doc = json.loads((SHARED_DATA / "qa" / "squad-v1.1-dev" / "dev-v1.1.json").read_text(encoding="utf-8"))
    doc["data"] = [dict(a, paragraphs=a["paragraphs"][:1]) for a in doc["data"][:3]]
    (tmp_path / "squad.json").write_text(json.dumps(doc), encoding="utf-8")
    code, out, err = run(capsys, "finetune", trained_run.out, "--task", "qa", "--data", tmp_path / "squad.json",
                         "--out", tmp_path / "qa", "--split-articles", 0.67, "--train.device", "cpu", "--train.max_steps", 2,
                         "--train.eval_interval", 0, "--train.threads", 1)
    assert code == 0 and f"--task qa --data {tmp_path / 'squad.json'} --split-articles 0.67" in out + err
