"""Token shards: exactly the corpus tokens, the held-out tail as val, nothing half-written."""

import importlib
import json
import random
from pathlib import Path

import numpy as np
import pytest

from lmforge.data import load_meta, open_split, prepare
from lmforge.data.prepare import safe_chunks, token_dtype
from lmforge.tokenizer import Tokenizer
from lmforge.utils.errors import UserError

# `lmforge.data.prepare` is the function (the package re-exports it over the submodule's name).
prepare_module = importlib.import_module("lmforge.data.prepare")
SHAKESPEARE = Path(__file__).parents[2] / "src/lmforge/assets/tinyshakespeare.txt"


@pytest.fixture(scope="module")
def shakespeare():
    return SHAKESPEARE.read_text(encoding="utf-8")[:80_000]


CODE = "".join(f"def f{i}():\n    if x:\n\n        return {i}\n\n\n" for i in range(200))


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory, shakespeare):
    directory = tmp_path_factory.mktemp("tok")
    Tokenizer.train([shakespeare, CODE, "日本語 emoji 😀 é"], vocab_size=600, show_progress=False).save(directory)
    return directory


@pytest.fixture(scope="module")
def tok(tok_dir):
    """Merges across whitespace (as GPT-2 has), so that a chunk cut inside a whitespace run shows."""
    tok = Tokenizer.load(tok_dir)
    assert all(len(tok.encode(ws)) == 1 for ws in ("\n\n", "\n   ", "    "))
    return tok


def reference(tok, parts):
    """Tokens a split must hold, computed one part at a time with the plain encoder."""
    return [i for part in parts for i in tok.encode(part) + [tok.eot_id]]


def read_split(out, split):
    meta = load_meta(out)
    files = [out / s["file"] for s in meta["splits"][split]["shards"]]
    return np.concatenate([np.fromfile(f, dtype="<u2") for f in files] or [np.zeros(0, "<u2")]).tolist()


def write_docs(tmp_path, docs):
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    return path


def test_shards_hold_exactly_the_corpus_tokens(tmp_path, tok, tok_dir, shakespeare, monkeypatch):
    # Small chunks and batches so that chunking, several batches and several shards all happen.
    monkeypatch.setattr(prepare_module, "CHUNK_CHARS", 1000)
    monkeypatch.setattr(prepare_module, "BATCH_CHARS", 7000)
    docs = [shakespeare[i : i + 7919] for i in range(0, 40_000, 7919)] + ["short one", "日本語 😀\n ünïcödé"]
    meta = prepare([write_docs(tmp_path, docs)], tok_dir, tmp_path / "out", shard_tokens=3000, progress=False)

    # Independent split: concatenate everything; val starts at the first line start at or after 90%.
    full = "".join(docs)
    boundary = next(p for p in range(int(len(full) * 0.9), len(full)) if full[p - 1] == "\n")
    train_parts, val_parts, start = [], [], 0
    for d in docs:
        end = start + len(d)
        train_parts += [full[start : min(end, boundary)]] if start < boundary else []
        val_parts += [full[max(start, boundary) : end]] if end > boundary else []
        start = end
    assert read_split(tmp_path / "out", "train") == reference(tok, train_parts)
    assert read_split(tmp_path / "out", "val") == reference(tok, val_parts)

    for split, parts in (("train", train_parts), ("val", val_parts)):
        info = meta["splits"][split]
        assert info["documents"] == len(parts)
        assert info["bytes"] == sum(len(p.encode()) for p in parts)
        assert info["tokens"] == sum(s["tokens"] for s in info["shards"]) == len(reference(tok, parts))
        assert all(0 < s["tokens"] <= 3000 for s in info["shards"])
        assert info["bytes_per_token"] == pytest.approx(info["bytes"] / info["tokens"], abs=1e-4)
    assert len(meta["splits"]["train"]["shards"]) > 1


@pytest.mark.parametrize(
    "val_fraction, first_val_line",
    [
        (133 / 1024, 112),  # cut 891, inside line 111: the rest of line 111 stays in train
        (129 / 1024, 112),  # cut 895, on line 111's newline
        (128 / 1024, 112),  # cut 896, exactly at the start of line 112: nothing moves
        (127 / 1024, 113),  # cut 897, just inside line 112
    ],
)
def test_split_is_at_the_first_line_start_at_or_after_the_cut(tmp_path, tok, tok_dir, val_fraction, first_val_line):
    lines = [f"line{i:03d}\n" for i in range(128)]  # 8 characters each, 1024 in all: exact binary fractions
    (tmp_path / "a.txt").write_text("".join(lines))
    meta = prepare([tmp_path / "a.txt"], tok_dir, tmp_path / "out", val_fraction=val_fraction, progress=False)
    assert tok.decode(read_split(tmp_path / "out", "train")) == "".join(lines[:first_val_line]) + "<|endoftext|>"
    assert tok.decode(read_split(tmp_path / "out", "val")) == "".join(lines[first_val_line:]) + "<|endoftext|>"
    assert meta["splits"]["val"]["bytes"] == 8 * (128 - first_val_line)
    assert meta["splits"]["train"]["documents"] == meta["splits"]["val"]["documents"] == 1


def test_val_is_the_last_tenth_of_tinyshakespeare(tmp_path, tok, tok_dir, shakespeare):
    (tmp_path / "s.txt").write_text(shakespeare)
    prepare([tmp_path / "s.txt"], tok_dir, tmp_path / "out", progress=False)
    val = tok.decode(read_split(tmp_path / "out", "val")).removesuffix("<|endoftext|>")
    assert shakespeare.endswith(val)
    assert 0.1 * len(shakespeare) - 100 < len(val) <= 0.1 * len(shakespeare)  # within one line of 10%
    assert shakespeare[-len(val) - 1] == "\n"
    assert read_split(tmp_path / "out", "val") == reference(tok, [val])


def test_whole_documents_past_the_cut_go_to_val(tmp_path, tok, tok_dir):
    docs = ["a" * 79 + "\n", "b" * 9 + "\n", "c" * 9 + "\n"]  # 100 characters; the cut at 90 is doc 2's start
    meta = prepare([write_docs(tmp_path, docs)], tok_dir, tmp_path / "out", progress=False)
    assert read_split(tmp_path / "out", "train") == reference(tok, docs[:2])
    assert read_split(tmp_path / "out", "val") == reference(tok, docs[2:])
    assert meta["documents"] == 3


def test_duplicates_are_dropped_and_counted(tmp_path, tok, tok_dir):
    a, b, c = "first document\n", "second document\n", "third\n"
    meta = prepare([write_docs(tmp_path, [a, b, a, c, b, "e\u0301\n", "\u00e9\n"])], tok_dir, tmp_path / "out",
                   val_fraction=0.0, progress=False)
    assert meta["duplicates_dropped"] == 3  # a, b, and the NFC twin of 'é'
    assert meta["documents"] == 4
    assert read_split(tmp_path / "out", "train") == reference(tok, [a, b, c, "\u00e9\n"])


def test_val_fraction_zero_means_no_val(tmp_path, tok, tok_dir, shakespeare):
    (tmp_path / "s.txt").write_text(shakespeare[:5000])
    meta = prepare([tmp_path / "s.txt"], tok_dir, tmp_path / "out", val_fraction=0.0, progress=False)
    assert meta["splits"]["val"] == {"tokens": 0, "bytes": 0, "documents": 0, "bytes_per_token": None, "shards": []}
    assert read_split(tmp_path / "out", "train") == reference(tok, [shakespeare[:5000]])
    with pytest.raises(UserError, match="has no val tokens"):
        open_split(tmp_path / "out", "val")


def test_meta_describes_the_data(tmp_path, tok, tok_dir):
    (tmp_path / "a.txt").write_text("hello\nworld\n" * 50)
    meta = prepare([str(tmp_path / "a.txt")], tok_dir, tmp_path / "out", progress=False)
    assert meta == load_meta(tmp_path / "out")
    assert meta["format"] == 1
    assert meta["tokenizer_sha256"] == tok.sha256 == Tokenizer.load(tmp_path / "out").sha256
    assert (meta["vocab_size"], meta["eot_id"], meta["dtype"]) == (600, 0, "uint16")
    assert meta["sources"] == [str(tmp_path / "a.txt")]
    assert meta["val_fraction"] == 0.1
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["meta.json", "tokenizer.json", "tokenizer_config.json", "train-00000.bin", "val-00000.bin"]


def test_progress_bar_goes_to_stderr(tmp_path, tok_dir, capsys):
    (tmp_path / "a.txt").write_text("hello\nworld\n" * 50)
    prepare([tmp_path / "a.txt"], tok_dir, tmp_path / "out", progress=True)
    captured = capsys.readouterr()
    assert "tokenizing" in captured.err and captured.out == ""


def test_rerun_replaces_a_data_directory(tmp_path, tok_dir):
    (tmp_path / "a.txt").write_text("hello\nworld\n" * 50)
    prepare([tmp_path / "a.txt"], tok_dir, tmp_path / "out", shard_tokens=10, progress=False)
    meta = prepare([tmp_path / "a.txt"], tok_dir, tmp_path / "out", progress=False)
    assert sorted(p.name for p in (tmp_path / "out").glob("*.bin")) == ["train-00000.bin", "val-00000.bin"]
    assert len(meta["splits"]["train"]["shards"]) == 1


def test_rerun_replaces_data_made_with_a_tokenizer_of_several_end_ids(tmp_path, tok_dir):
    """Seen in review: the tokenizer's generation_config.json (an imported Llama 3 Instruct's end ids),
    saved into the data, made the next prepare refuse the directory as not its own."""
    import shutil

    tok = shutil.copytree(tok_dir, tmp_path / "tok")
    (tok / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 5]}))
    (tmp_path / "a.txt").write_text("hello\nworld\n" * 50)
    for _ in range(2):
        prepare([tmp_path / "a.txt"], tok, tmp_path / "out", progress=False)
    assert Tokenizer.load(tmp_path / "out").end_ids == (Tokenizer.load(tok).eot_id, 5)
    from lmforge.data import train_tokenizer

    (tmp_path / "tok2").mkdir()  # a tokenizer folder holds it too (Tokenizer.save writes it): replaced as well
    Tokenizer.load(tok).save(tmp_path / "tok2")
    train_tokenizer([tmp_path / "a.txt"], 300, tmp_path / "tok2", progress=False)


def test_never_replaces_a_folder_holding_its_corpus_but_may_write_inside_one(tmp_path, tok_dir):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("hello\nworld\n" * 50)
    prepare([tmp_path / "corpus"], tok_dir, tmp_path / "corpus" / "prepared", progress=False)  # beside its corpus: fine
    text = tmp_path / "corpus" / "prepared" / "notes.txt"
    meta = tmp_path / "corpus" / "prepared" / "meta.json"
    for source, out in ((meta, meta.parent), (tmp_path / "corpus", tmp_path / "corpus")):
        with pytest.raises(UserError, match=rf"^--out {out} (holds|is) the input {source}, which replacing the folder"):
            prepare([source], tok_dir, out, progress=False)
    assert meta.is_file() and not text.exists()


def test_refuses_to_replace_a_directory_that_is_not_data(tmp_path, tok_dir):
    (tmp_path / "a.txt").write_text("hello\nworld\n")
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "precious.txt").write_text("keep me")
    with pytest.raises(UserError, match="is not a prepared data directory"):
        prepare([tmp_path / "a.txt"], tok_dir, tmp_path / "home", progress=False)
    assert (tmp_path / "home" / "precious.txt").read_text() == "keep me"


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 1.5])
def test_val_fraction_out_of_range(tmp_path, tok_dir, fraction):
    (tmp_path / "a.txt").write_text("hello\n")
    with pytest.raises(UserError, match=r"val_fraction .* out of range"):
        prepare([tmp_path / "a.txt"], tok_dir, tmp_path / "out", val_fraction=fraction, progress=False)


def test_failures_leave_nothing_behind(tmp_path, tok_dir):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(UserError, match=r"corpus .*empty\.txt is empty"):
        prepare([tmp_path / "empty.txt"], tok_dir, tmp_path / "out", progress=False)
    # One long line: no line break after the cut, so val would be empty; fails after tokenizing.
    (tmp_path / "line.txt").write_text("no line break anywhere " * 20)
    with pytest.raises(UserError, match="val split is empty: the last 10% of the text.*val_fraction=0"):
        prepare([tmp_path / "line.txt"], tok_dir, tmp_path / "out", progress=False)
    with pytest.raises(UserError, match=r"the last 1e-07% of the text"):  # not "0%"
        prepare([tmp_path / "line.txt"], tok_dir, tmp_path / "out", val_fraction=1e-9, progress=False)
    with pytest.raises(UserError, match="train split is empty"):
        prepare([tmp_path / "line.txt"], tok_dir, tmp_path / "out", val_fraction=0.999, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.txt", "line.txt"]  # no out, no temp dirs


def test_interrupt_keeps_the_previous_data(tmp_path, tok_dir, monkeypatch):
    """Ctrl-C in the middle of tokenizing leaves the last complete data directory as it was."""
    (tmp_path / "a.txt").write_text("hello\nworld\n" * 50)
    before = prepare([tmp_path / "a.txt"], tok_dir, tmp_path / "out", progress=False)
    files = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}

    def interrupt(self, texts, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(Tokenizer, "encode_batch", interrupt)
    (tmp_path / "b.txt").write_text("other\ntext\n" * 50)
    with pytest.raises(KeyboardInterrupt):
        prepare([tmp_path / "b.txt"], tok_dir, tmp_path / "out", progress=False)
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == files
    assert load_meta(tmp_path / "out") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.txt", "out"]  # no temp dir left


def test_missing_tokenizer(tmp_path):
    (tmp_path / "a.txt").write_text("hello\n")
    with pytest.raises(UserError, match="no tokenizer.json in"):
        prepare([tmp_path / "a.txt"], tmp_path / "nowhere", tmp_path / "out", progress=False)


def test_dtype_is_uint32_only_past_65536_tokens():
    assert token_dtype(600) == np.uint16
    assert token_dtype(65536) == np.uint16  # ids 0..65535 fit
    assert token_dtype(65537) == np.uint32
    assert token_dtype(128256) == np.uint32


def test_open_split_maps_the_shards_read_only(tmp_path, tok_dir):
    (tmp_path / "a.txt").write_text("hello\nworld\n" * 200)
    meta = prepare([tmp_path / "a.txt"], tok_dir, tmp_path / "out", shard_tokens=100, progress=False)
    maps = open_split(tmp_path / "out", "train")
    assert len(maps) == len(meta["splits"]["train"]["shards"]) > 1
    assert np.concatenate(maps).tolist() == read_split(tmp_path / "out", "train")
    assert all(m.dtype == np.uint16 for m in maps)
    with pytest.raises(ValueError):
        maps[0][0] = 1


def test_open_split_errors(tmp_path, tok_dir):
    with pytest.raises(UserError, match=r"is not a prepared data directory \(no meta.json\); run `lmforge prepare"):
        open_split(tmp_path / "nowhere", "train")
    (tmp_path / "a.txt").write_text("hello\nworld\n" * 200)
    prepare([tmp_path / "a.txt"], tok_dir, tmp_path / "out", shard_tokens=100, progress=False)
    with pytest.raises(UserError, match="unknown split 'test'"):
        open_split(tmp_path / "out", "test")
    shard = tmp_path / "out" / "train-00001.bin"
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(UserError, match=r"train-00001\.bin is 198 bytes, expected 200; re-run"):
        open_split(tmp_path / "out", "train")
    shard.unlink()
    with pytest.raises(UserError, match=r"train-00001\.bin is missing"):
        open_split(tmp_path / "out", "train")


@pytest.mark.parametrize("damage,message", [
    (lambda m: [], r"meta.json holds a JSON list, not a data description"),
    (lambda m: m.pop("splits"), r"meta.json is damaged \(no splits\)"),
    (lambda m: m["splits"].pop("val"), r"meta.json is damaged \(no val split\)"),
    (lambda m: m["splits"]["train"].pop("tokens"), r"meta.json is damaged \(the train split has no tokens count\)"),
    (lambda m: m["splits"]["train"]["shards"].append({"file": "../x.bin", "tokens": 1}), r"train split's shard list is malformed"),
    (lambda m: m.update(dtype="uint77"), r"meta.json is damaged \(dtype 'uint77' is not an unsigned integer type"),
    (lambda m: m.update(dtype="float32"), r"dtype 'float32' is not an unsigned integer type"),
])
def test_a_damaged_meta_is_one_line_naming_it(tmp_path, tok_dir, damage, message):
    """What readers of meta.json index without checking (pretrain, objectives, open_split) is checked on load."""
    (tmp_path / "a.txt").write_text("hello\nworld\n" * 200)
    prepare([tmp_path / "a.txt"], tok_dir, tmp_path / "out", progress=False)
    path = tmp_path / "out" / "meta.json"
    meta = json.loads(path.read_text())
    replaced = damage(meta)  # edits meta in place, or returns what replaces it
    meta = replaced if isinstance(replaced, list) else meta
    path.write_text(json.dumps(meta))
    with pytest.raises(UserError, match=message + r".*re-run `lmforge prepare ... --out"):
        load_meta(tmp_path / "out")


def safe_positions(text):
    """Every position where a chunk may start, straight from the definition."""
    return [
        i for i in range(2, len(text)) if text[i - 1] == "\n" and not text[i - 2].isspace() and not text[i].isspace()
    ]


@pytest.mark.parametrize("chunk_chars", [1, 100, 5000])
def test_safe_chunks_encode_like_the_whole_text(tok, shakespeare, chunk_chars):
    text = shakespeare[:20_000] if chunk_chars == 1 else shakespeare
    pieces = safe_chunks(text, chunk_chars)
    assert "".join(pieces) == text and len(pieces) > 3
    starts = np.cumsum([0] + [len(p) for p in pieces[:-1]])[1:].tolist()
    safe = safe_positions(text)
    # Each cut is the first safe position at least chunk_chars past the previous one.
    assert starts == [next(i for i in safe if i >= prev + chunk_chars) for prev in [0] + starts[:-1]]
    assert [i for ids in tok.encode_batch(pieces) for i in ids] == tok.encode(text)


def test_safe_chunks_on_tricky_whitespace(tok):
    """Random text dense in newlines, Unicode spaces, contractions and specials, cut at every safe position."""
    atoms = ["\n", "\n\n", " ", "    ", "\t", "\r\n", "\u3000", "\xa0", "\x1c", "\x85", "\u2028", "\u200b",
             "a", "return", "7", "'s", "'ll", "é", "中文", "😀", "<|endoftext|>", ".", "--", "\u0301"]
    rng = random.Random(0)
    for _ in range(20):
        text = "".join(rng.choice(atoms) for _ in range(400))
        pieces = safe_chunks(text, 1)
        starts = np.cumsum([len(p) for p in pieces[:-1]]).tolist()
        assert "".join(pieces) == text and starts == safe_positions(text)
        assert [i for ids in tok.encode_batch(pieces) for i in ids] == tok.encode(text)


def test_an_unsafe_cut_would_be_caught(tok):
    """The equivalence above is a real check: a cut between two newlines changes the tokens."""
    text = "return 1\n\n\nreturn 2"
    cut = text.index("\n") + 1
    assert tok.encode(text[:cut]) + tok.encode(text[cut:]) != tok.encode(text)


@pytest.mark.parametrize("extra", ["step-000010/config.json", "notes.txt", "run/metrics.jsonl"])
def test_refuses_to_replace_data_that_holds_anything_prepare_did_not_write(tmp_path, tok_dir, extra):
    """`pretrain --out` inside the data directory, or a file the user put there, would vanish with it."""
    (tmp_path / "a.txt").write_text("hello\nworld\n" * 50)
    prepare([tmp_path / "a.txt"], tok_dir, tmp_path / "out", shard_tokens=10, progress=False)
    (tmp_path / "out" / extra).parent.mkdir(exist_ok=True)
    (tmp_path / "out" / extra).write_text("keep me")
    with pytest.raises(UserError, match=f"holds {extra.split('/')[0]}, which `lmforge prepare` did not write"):
        prepare([tmp_path / "a.txt"], tok_dir, tmp_path / "out", progress=False)
    assert (tmp_path / "out" / extra).read_text() == "keep me"


@pytest.mark.parametrize("out", ["", "."])
def test_the_current_directory_or_an_empty_out_is_one_line(out, tmp_path, tok_dir, monkeypatch):
    """Replacing the current directory would pull it from under the shell, even when it is empty."""
    (tmp_path / "a.txt").write_text("hello\nworld\n" * 20)
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    with pytest.raises(UserError, match="current directory|empty") as err:
        prepare([tmp_path / "a.txt"], tok_dir, out, progress=False)
    assert "\n" not in str(err.value) and list((tmp_path / "here").iterdir()) == []


def test_an_out_that_cannot_be_renamed_is_one_line_and_keeps_the_old_data_and_the_new(tmp_path, tok_dir, monkeypatch):
    """`chattr +i out`: renaming it aside fails with EPERM. The tokenized corpus is kept, and named."""
    import errno
    import os

    (tmp_path / "a.txt").write_text("hello\nworld\n" * 50)
    out = tmp_path / "out"
    prepare([tmp_path / "a.txt"], tok_dir, out, progress=False)
    files = {p.name: p.read_bytes() for p in out.iterdir()}
    replace = os.replace

    def immutable(src, dst):
        if str(src) == str(out):
            raise PermissionError(errno.EPERM, "Operation not permitted", str(src), None, str(dst))
        replace(src, dst)

    monkeypatch.setattr(os, "replace", immutable)
    with pytest.raises(UserError, match=f"cannot replace {out}") as err:
        prepare([tmp_path / "a.txt"], tok_dir, out, progress=False)
    assert "\n" not in str(err.value)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == files
    kept = [p for p in tmp_path.iterdir() if p.name not in ("a.txt", "out")]
    assert len(kept) == 1 and f"kept in {kept[0]}" in str(err.value)
    assert {p.name: p.read_bytes() for p in kept[0].iterdir()} == files  # the same corpus: the same shards


def test_an_out_that_cannot_be_written_fails_before_the_corpus_is_read(tmp_path, tok_dir, monkeypatch):
    (tmp_path / "afile").write_text("")
    (tmp_path / "a.txt").write_text("hello\nworld\n" * 50)

    def read(*args):
        raise AssertionError("the corpus was read before the output was checked")

    monkeypatch.setattr(prepare_module, "_scan", read)
    with pytest.raises(UserError, match="afile is a file"):
        prepare([tmp_path / "a.txt"], tok_dir, tmp_path / "afile" / "data", progress=False)


@pytest.mark.parametrize("change", ["grows", "shrinks", "is edited"])
def test_a_corpus_that_changes_between_the_passes_is_one_line(tmp_path, tok_dir, monkeypatch, change):
    """A writer still appending to a .jsonl: the split and the duplicates were counted on other text."""
    corpus = write_docs(tmp_path, ["first document\n", "second document\n", "third document\n"])
    scan = prepare_module._scan

    def scan_then_change(paths, progress):
        counted = scan(paths, progress)
        lines = corpus.read_text().splitlines(keepends=True)
        edited = {"grows": lines + ['{"text": "appended later"}\n'], "shrinks": lines[:-1],
                  "is edited": lines[:-1] + ['{"text": "third document, longer now\\n"}\n']}[change]
        corpus.write_text("".join(edited))
        return counted

    monkeypatch.setattr(prepare_module, "_scan", scan_then_change)
    with pytest.raises(UserError, match="^the corpus changed while it was being prepared; run prepare again$"):
        prepare([corpus], tok_dir, tmp_path / "out", val_fraction=0, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.jsonl"]


@pytest.mark.parametrize("decoder", ["llama2", "metaspace"])
def test_sentencepiece_style_documents_are_encoded_whole(tmp_path, monkeypatch, decoder):
    """A SentencePiece-style tokenizer (Llama 2's normalizer, a Metaspace pre-tokenizer) puts '▁' before
    every text it encodes: a long document cut into chunks had a spurious '▁' at every cut."""
    monkeypatch.syspath_prepend(Path(__file__).parents[1] / "tokenizer")
    from test_foreign import _save, _sentencepiece

    monkeypatch.setattr(prepare_module, "CHUNK_CHARS", 100)
    (tmp_path / "tok").mkdir()
    tok = Tokenizer.load(_save(tmp_path / "tok", _sentencepiece(decoder, True), {"eos_token": "</s>"}))
    doc = "\n".join(f"line number {i} of the text" for i in range(100))
    (tmp_path / "doc.txt").write_text(doc)
    meta = prepare([tmp_path / "doc.txt"], tmp_path / "tok", tmp_path / "out", val_fraction=0, progress=False)
    assert read_split(tmp_path / "out", "train") == tok.encode(doc) + [tok.eot_id]
    assert meta["splits"]["train"]["tokens"] == len(tok.encode(doc)) + 1
    assert not prepare_module.chunks_encode_like_the_whole(tok)


def test_lmforge_tokenizers_are_encoded_in_chunks(tok):
    assert prepare_module.chunks_encode_like_the_whole(tok)


def test_only_a_literal_end_of_text_is_a_special_token_in_a_corpus(tmp_path, tok, tok_dir):
    """As nanoGPT's tiktoken `encode_ordinary`, but with TinyStories' "<|endoftext|>" separators matched:
    a corpus that spells <|mask|> or <|pad|> must not hold the mask or pad token (an MLM target)."""
    import tokenizers

    text = "Once upon a time.\n<|endoftext|>\nThe end <|pad|> of <|mask|> all<|cls|><|sep|>\n"
    (tmp_path / "a.txt").write_text(text)
    prepare([tmp_path / "a.txt"], tok_dir, tmp_path / "out", val_fraction=0, progress=False)
    got = read_split(tmp_path / "out", "train")
    plain = tokenizers.Tokenizer.from_str(tok.to_str())
    plain.encode_special_tokens = True  # HF's own switch: every special token's text read as text
    first, rest = text.split("<|endoftext|>")
    assert got == plain.encode(first).ids + [tok.eot_id] + plain.encode(rest).ids + [tok.eot_id]
    assert {tok.pad_id, tok.mask_id, tok.cls_id, tok.sep_id}.isdisjoint(got)
    assert tok.decode(got) == text + "<|endoftext|>"


def test_a_damaged_tokenizer_in_the_data_directory_says_to_re_prepare(data_dir, tmp_path):
    import shutil

    from lmforge.train import pretrain

    data = tmp_path / "data"
    shutil.copytree(data_dir, data)
    (data / "tokenizer.json").write_text("{")
    with pytest.raises(UserError, match="tokenizer.json is corrupt") as err:
        pretrain(data, tmp_path / "run", "tiny", progress=False, log=lambda *a: None)
    assert "tokenizer train" not in str(err.value) and "prepare" in str(err.value)


def test_an_empty_val_split_is_known_before_the_tokenizing(tmp_path, tok_dir, monkeypatch):
    """Seen in review: one long line (a text8-style corpus) was tokenized whole before the empty val split showed."""
    prep = importlib.import_module("lmforge.data.prepare")  # the package's `prepare` is the function

    (tmp_path / "line.txt").write_text("no line break anywhere " * 20)

    def tokenize(*args, **kwargs):
        raise AssertionError("tokenized before the empty val split was found")

    monkeypatch.setattr(prep, "_tokenize", tokenize)
    with pytest.raises(UserError, match="val split is empty"):
        prepare([tmp_path / "line.txt"], tok_dir, tmp_path / "out", progress=False)


def test_the_early_val_check_agrees_with_the_split_it_predicts(tmp_path, tok_dir, monkeypatch):
    """The first pass's verdict (a line start at or after the cut) against what the second pass writes,
    on random corpora of short lines, trailing newlines and duplicate documents, at random fractions."""
    prep = importlib.import_module("lmforge.data.prepare")  # the package's `prepare` is the function

    rng = random.Random(0)
    verdicts = []
    for case in range(150):
        docs = ["".join(rng.choice("ab\n") for _ in range(rng.randint(1, 12))) for _ in range(rng.randint(1, 4))]
        docs = [d for d in docs if d.strip()] or ["ab"]
        files = []
        for i, doc in enumerate(docs):
            (tmp_path / f"c{case}-{i}.txt").write_text(doc, encoding="utf-8")
            files.append(tmp_path / f"c{case}-{i}.txt")
        fraction = rng.choice([0.05, 0.1, 0.3, 0.5, 0.9])
        keep, total, _, last_line_start = prep._scan(files, progress=False)
        if total == 0:
            continue
        early_empty = last_line_start < int(total * (1.0 - fraction))
        with monkeypatch.context() as m:  # the late check alone: what the split really holds
            m.setattr(prep, "_scan", lambda paths, progress: (keep, total, 0, total))
            try:
                meta = prepare(files, tok_dir, tmp_path / f"out{case}", val_fraction=fraction, progress=False)
                late_empty = meta["splits"]["val"]["tokens"] == 0
            except UserError as e:
                late_empty = "val split is empty" in str(e)
                assert late_empty or "train split is empty" in str(e), e
                if not late_empty:
                    continue
        verdicts.append(early_empty)
        assert early_empty == late_empty, (docs, fraction)
    assert 10 < sum(verdicts) < len(verdicts) - 10  # both verdicts were exercised


def test_a_byte_level_tokenizer_that_adds_a_prefix_space_is_encoded_whole(tmp_path, tok, monkeypatch):
    """ByteLevel(add_prefix_space=True) (RoBERTa's, some GPT-2 exports) puts a space before every text it
    encodes: cut into chunks, every chunk after the first would start with a spurious 'Ġ'."""
    import tokenizers
    from tokenizers import pre_tokenizers

    monkeypatch.setattr(prepare_module, "CHUNK_CHARS", 100)
    hf = tokenizers.Tokenizer.from_str(tok.to_str())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    (tmp_path / "tok").mkdir()
    hf.save(str(tmp_path / "tok" / "tokenizer.json"))
    spaced = Tokenizer.load(tmp_path / "tok")
    doc = "\n".join(f"line number {i} of the text" for i in range(100))
    assert len(safe_chunks(doc, 100)) > 1
    assert spaced.encode("line")[0] != tok.encode("line")[0]  # the space shows: "Ġline", not "line"
    (tmp_path / "doc.txt").write_text(doc)
    prepare([tmp_path / "doc.txt"], tmp_path / "tok", tmp_path / "out", val_fraction=0, progress=False)
    assert read_split(tmp_path / "out", "train") == spaced.encode(doc) + [spaced.eot_id]
    assert not prepare_module.chunks_encode_like_the_whole(spaced)
