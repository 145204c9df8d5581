"""Where import and export may write, and what a damaged input's error tells the user to do."""

import shutil
import struct

import pytest

from lmforge.interop import export_hf, import_gguf, import_hf
from lmforge.utils.errors import UserError
from test_gguf import TINY, gguf_bytes, smollm2_file, tiny_llama_tensors


def _files(path):
    return sorted(p.name for p in path.iterdir())


@pytest.fixture
def run(trained_run, tmp_path):
    """A copy of the session's run: its steps hold optimizer state and metrics."""
    shutil.copytree(trained_run.out, tmp_path / "run")
    return tmp_path / "run"


def test_export_never_writes_over_its_source_or_a_training_checkpoint(run, tmp_path):
    step = sorted(run.glob("step-*"))[-1]
    before = _files(step)
    for out, says in ((step, "is the source"), (run, "holds the source"), (step / "hf", "is inside the source")):
        with pytest.raises(UserError, match=says) as err:
            export_hf(step, out)
        assert "\n" not in str(err.value)
    assert _files(step) == before
    older = sorted(run.glob("step-*"))[0]
    with pytest.raises(UserError, match="optimizer.safetensors.*pass a new --out"):
        export_hf(step, older)
    assert "optimizer.safetensors" in _files(older)
    out = export_hf(step, tmp_path / "hf")
    assert export_hf(step, out) == out  # an earlier export is replaced


def test_import_never_writes_over_a_run_or_a_model_of_another_kind(run, tmp_path):
    (tmp_path / "m.gguf").write_bytes(gguf_bytes(tiny_llama_tensors(2), TINY))
    step = sorted(run.glob("step-*"))[-1]
    for out in (run, step):
        with pytest.raises(UserError, match="pass a new --out"):
            import_gguf(tmp_path / "m.gguf", out)
    assert "optimizer.safetensors" in _files(step)
    ckpt = import_gguf(tmp_path / "m.gguf", tmp_path / "ckpt")
    assert import_gguf(tmp_path / "m.gguf", ckpt) == ckpt  # an earlier import is replaced
    hf = export_hf(ckpt, tmp_path / "hf")
    with pytest.raises(UserError, match="hf exists and is not a checkpoint directory"):
        import_gguf(tmp_path / "m.gguf", hf)  # a Hugging Face directory is not an earlier import
    other = import_gguf(tmp_path / "m.gguf", tmp_path / "other")
    with pytest.raises(UserError, match="other exists and is not a model directory"):
        export_hf(ckpt, other)  # nor is an lmforge checkpoint an earlier export
    with pytest.raises(UserError, match="is the source"):
        import_hf(hf, hf)


def test_export_never_replaces_another_model_even_one_transformers_saved_from_an_export(trained_run, tmp_path):
    """Any directory whose config.json named a model_type counted as an earlier export: a downloaded
    model's directory was replaced, and the user's other files in it deleted."""
    transformers = pytest.importorskip("transformers")
    other = tmp_path / "downloaded"
    transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=64)).save_pretrained(other)
    (other / "README.md").write_text("my notes")
    before = _files(other)
    with pytest.raises(UserError, match="downloaded holds another model .*; pass another --out") as err:
        export_hf(trained_run.out, other)
    assert "\n" not in str(err.value)
    assert _files(other) == before
    # transformers carries config.json's keys into what it saves: the mark of an export is a file of its own
    out = export_hf(trained_run.out, tmp_path / "hf")
    transformers.AutoModelForCausalLM.from_pretrained(out).save_pretrained(tmp_path / "tuned")
    with pytest.raises(UserError, match="tuned holds another model"):
        export_hf(trained_run.out, tmp_path / "tuned")
    assert export_hf(trained_run.out, out) == out  # an earlier export is still replaced


@pytest.mark.parametrize("out", ["", "."])
def test_an_empty_out_or_the_current_directory_is_one_line(out, trained_run, tmp_path, monkeypatch):
    (tmp_path / "m.gguf").write_bytes(gguf_bytes(tiny_llama_tensors(2), TINY))
    ckpt = import_gguf(tmp_path / "m.gguf", tmp_path / "ckpt")
    hf = export_hf(ckpt, tmp_path / "hf")
    work = tmp_path / "empty"
    work.mkdir()
    monkeypatch.chdir(work)
    for call in (lambda: import_gguf(tmp_path / "m.gguf", out), lambda: import_hf(hf, out),
                 lambda: export_hf(trained_run.out, out)):
        with pytest.raises(UserError, match="current directory|empty") as err:
            call()
        assert "\n" not in str(err.value)
    assert _files(work) == []


def test_a_checkpoint_with_a_damaged_tokenizer_names_the_checkpoint_not_a_new_tokenizer(run, tmp_path):
    step = sorted(run.glob("step-*"))[-1]
    (step / "tokenizer.json").write_text('{"version": "1.0", "model":')
    with pytest.raises(UserError, match="tokenizer.json is corrupt") as err:
        export_hf(step, tmp_path / "hf")
    message = str(err.value)
    assert "tokenizer train" not in message and "restore" in message and str(step) in message


def test_a_hugging_face_directory_without_its_tokenizer_says_to_re_download(trained_run, tmp_path):
    hf = export_hf(trained_run.out, tmp_path / "hf")
    (hf / "tokenizer.json").unlink()
    with pytest.raises(UserError, match="tokenizer.json") as err:
        import_hf(hf, tmp_path / "ckpt")
    assert "tokenizer train" not in str(err.value) and "re-download" in str(err.value)


# ------------------------------------------------------------------------------- corrupt GGUF lengths
@pytest.mark.parametrize("offset,value", [(8, 10**10), (16, 10**12), (24, 2**62)])
def test_gguf_length_fields_past_the_end_of_the_file_are_one_line(offset, value, tmp_path):
    """The tensor count, the metadata count and the first key's length, each far beyond the file."""
    data = bytearray(gguf_bytes(tiny_llama_tensors(2), TINY))
    data[offset : offset + 8] = struct.pack("<Q", value)
    (tmp_path / "m.gguf").write_bytes(bytes(data))
    with pytest.raises(UserError, match="m.gguf is truncated or corrupt .*re-download it") as err:
        import_gguf(tmp_path / "m.gguf", tmp_path / "ckpt")
    assert "\n" not in str(err.value)


@pytest.fixture(scope="module")
def smollm2_copy(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "s.gguf"
    shutil.copyfile(smollm2_file(), path)
    return path


@pytest.mark.parametrize("offset,value", [(8, 10**10), (16, 10**12), (24, 2**62)])
def test_the_real_gguf_file_with_corrupt_lengths_is_one_line(offset, value, smollm2_copy, tmp_path):
    with open(smollm2_copy, "r+b") as f:
        f.seek(offset)
        kept = f.read(8)
        f.seek(offset)
        f.write(struct.pack("<Q", value))
    try:
        with pytest.raises(UserError, match="s.gguf is truncated or corrupt") as err:
            import_gguf(smollm2_copy, tmp_path / "ckpt")
        assert "\n" not in str(err.value)
    finally:
        with open(smollm2_copy, "r+b") as f:
            f.seek(offset)
            f.write(kept)


def test_a_corrupt_array_or_string_length_inside_the_metadata_is_one_line(tmp_path):
    data = gguf_bytes(tiny_llama_tensors(2), TINY)
    key = b"tokenizer.ggml.tokens"
    at = data.index(key) + len(key) + 8  # past the value type (u32) and the item type (u32): the count
    patched = data[:at] + struct.pack("<Q", 2**60) + data[at + 8:]
    (tmp_path / "m.gguf").write_bytes(patched)
    with pytest.raises(UserError, match="truncated or corrupt"):
        import_gguf(tmp_path / "m.gguf", tmp_path / "ckpt")
