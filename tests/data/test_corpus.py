"""Reading a corpus: what a document is, NFC, and one-line errors that name the file and the fix."""

import gzip
import json
import shutil
import subprocess

import pytest

from lmforge.data import Document, iter_documents, train_tokenizer
from lmforge.tokenizer import Tokenizer
from lmforge.utils.errors import UserError


def texts(paths):
    return [d.text for d in iter_documents(paths)]


def test_txt_file_is_one_document(tmp_path):
    body = "first line\n\nsecond paragraph\r\n\tindented\n"
    (tmp_path / "a.txt").write_bytes(body.encode())
    assert list(iter_documents([tmp_path / "a.txt"])) == [Document(str(tmp_path / "a.txt"), body)]


def test_jsonl_line_is_one_document(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"text": "one", "id": 1}\n\n   \n{"text": "two\\nlines"}\n{"text": ""}\n')
    docs = list(iter_documents([tmp_path / "d.jsonl"]))
    assert [d.text for d in docs] == ["one", "two\nlines"]  # blank lines and empty texts skipped
    assert [d.source for d in docs] == [f"{tmp_path / 'd.jsonl'}:1", f"{tmp_path / 'd.jsonl'}:4"]


def test_gzip_by_inner_extension(tmp_path):
    with gzip.open(tmp_path / "a.txt.gz", "wt", encoding="utf-8") as f:
        f.write("gzipped text\nwith two lines")
    with gzip.open(tmp_path / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write('{"text": "x"}\n{"text": "y"}\n')
    assert texts([tmp_path]) == ["gzipped text\nwith two lines", "x", "y"]


def test_directory_is_walked_recursively_in_sorted_order(tmp_path):
    for rel, body in {
        "b.TXT": "b",
        "a.md": "a",
        "sub/c.txt": "c",
        "sub/deeper/d.txt": "d",
        "z.py": "code is not corpus",
        ".hidden.txt": "hidden",
        ".git/HEAD.txt": "hidden dir",
    }.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(body)
    assert texts([tmp_path]) == ["a", "b", "c", "d"]
    assert texts([tmp_path / "z.py", tmp_path / "b.TXT"]) == ["code is not corpus", "b"]  # named files: any extension


def test_a_lone_path_string_is_one_path(tmp_path):
    (tmp_path / "a.txt").write_text("a")
    assert texts(str(tmp_path / "a.txt")) == ["a"]


def test_documents_are_nfc_normalised(tmp_path):
    (tmp_path / "a.txt").write_text("cafe\u0301 A\u030a")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "e\u0301"}) + "\n")
    assert texts([tmp_path / "a.txt", tmp_path / "b.jsonl"]) == ["café Å", "é"]


def test_byte_order_mark_is_dropped(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"\xef\xbb\xbfhello")
    (tmp_path / "b.jsonl").write_bytes(b'\xef\xbb\xbf{"text": "hi"}\n')
    assert texts([tmp_path / "a.txt", tmp_path / "b.jsonl"]) == ["hello", "hi"]


def test_invalid_utf8_names_file_offset_and_fix(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("naïve café".encode("latin-1"))
    with pytest.raises(UserError, match=r"latin1\.txt is not valid UTF-8 \(byte offset 2 .*iconv -f latin1 -t utf-8"):
        list(iter_documents([tmp_path / "latin1.txt"]))
    (tmp_path / "bad.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(UserError, match=r"bad\.jsonl is not valid UTF-8 \(byte offset 28 "):
        list(iter_documents([tmp_path / "bad.jsonl"]))


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"text": "unterminated', "invalid JSON"),
        ('{"body": "x"}', 'no "text" field'),
        ('["text"]', 'no "text" field'),
        ('{"text": 42}', '"text" is int, not a string'),
    ],
)
def test_bad_jsonl_names_file_and_line(tmp_path, line, message):
    (tmp_path / "d.jsonl").write_text('{"text": "fine"}\n' + line + "\n")
    with pytest.raises(UserError, match=rf"d\.jsonl:2: {message}"):
        list(iter_documents([tmp_path / "d.jsonl"]))


def test_an_unpaired_surrogate_in_jsonl_names_file_and_line(tmp_path):
    """JSON can spell half of a surrogate pair ("\\ud83d"); such text is no Unicode a tokenizer can
    encode (it crashed deduplication with UnicodeEncodeError). A whole pair is one character."""
    (tmp_path / "d.jsonl").write_text('{"text": "pair \\ud83d\\ude00"}\n{"text": "hello \\ud83d world"}\n')
    docs = iter_documents([tmp_path / "d.jsonl"])
    assert next(docs).text == "pair 😀"
    with pytest.raises(UserError, match=r"d\.jsonl:2: \"text\" is not valid Unicode: an unpaired surrogate "
                                        r"\(\\ud83d at character 6\)") as err:
        next(docs)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("paths", [[""], ""])
def test_an_empty_path_is_refused_not_read_as_the_current_directory(tmp_path, monkeypatch, paths):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "private.txt").write_text("not the corpus")
    with pytest.raises(UserError, match="an input path is empty"):
        list(iter_documents(paths))


def test_missing_path_fails_before_reading_anything(tmp_path):
    (tmp_path / "a.txt").write_text("a")
    docs = iter_documents([tmp_path / "a.txt", tmp_path / "typo.txt"])
    with pytest.raises(UserError, match=r"typo\.txt does not exist"):
        next(docs)


def test_directory_without_corpus_files(tmp_path):
    (tmp_path / "notes.py").write_text("x = 1")
    with pytest.raises(UserError, match=r"has no \.txt, \.md or \.jsonl files"):
        list(iter_documents([tmp_path]))


def test_corrupt_gzip(tmp_path):
    (tmp_path / "a.txt.gz").write_bytes(b"this is not gzip")
    with pytest.raises(UserError, match=r"a\.txt\.gz is not a valid gzip file"):
        list(iter_documents([tmp_path / "a.txt.gz"]))


def test_train_tokenizer_writes_a_loadable_tokenizer(tmp_path):
    (tmp_path / "a.txt").write_text("the cat sat on the mat\n" * 50)
    tok = train_tokenizer([tmp_path / "a.txt"], vocab_size=300, out=tmp_path / "tok", progress=False)
    assert Tokenizer.load(tmp_path / "tok").sha256 == tok.sha256
    assert tok.decode(tok.encode("the cat")) == "the cat"


def test_train_tokenizer_ignores_duplicate_documents(tmp_path):
    a, b = "the cat sat on the mat\n" * 5, "a dog barked at the moon\n" * 5
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in [a, a, a, b, a]))
    (tmp_path / "u.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in [a, b]))
    deduped = train_tokenizer([tmp_path / "d.jsonl"], vocab_size=300, out=tmp_path / "t1", progress=False)
    unique = train_tokenizer([tmp_path / "u.jsonl"], vocab_size=300, out=tmp_path / "t2", progress=False)
    assert deduped.sha256 == unique.sha256


def test_train_tokenizer_on_empty_corpus(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(UserError, match="is empty"):
        train_tokenizer([tmp_path / "empty.txt"], vocab_size=300, out=tmp_path / "tok", progress=False)
    assert not (tmp_path / "tok").exists()


def test_upper_case_gzip_names_are_decompressed(tmp_path):
    with gzip.open(tmp_path / "A.TXT.GZ", "wt", encoding="utf-8") as f:
        f.write("shouted text")
    with gzip.open(tmp_path / "b.JSONL.Gz", "wt", encoding="utf-8") as f:
        f.write('{"text": "x"}\n')
    assert texts([tmp_path]) == ["shouted text", "x"]
    (tmp_path / "C.TXT.GZ").write_bytes(gzip.compress(b"caf\xe9"))
    with pytest.raises(UserError, match="byte offset 3 of the decompressed text"):
        list(iter_documents([tmp_path / "C.TXT.GZ"]))


@pytest.mark.parametrize("marker, what", [("meta.json", "prepared data"), ("config.json", "a checkpoint"),
                                          ("model.safetensors", "a checkpoint")])
def test_train_tokenizer_refuses_to_overwrite_the_tokenizer_of_data_or_a_checkpoint(tmp_path, marker, what):
    """Shards and weights were made with the tokenizer.json beside them: replacing it gives garbage."""
    (tmp_path / "a.txt").write_text("the cat sat on the mat\n" * 50)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / marker).write_text("{}")
    (tmp_path / "out" / "tokenizer.json").write_text("the original")
    with pytest.raises(UserError, match=f"out holds {what}.*pass another --out"):
        train_tokenizer([tmp_path / "a.txt"], vocab_size=300, out=tmp_path / "out", progress=False)
    assert (tmp_path / "out" / "tokenizer.json").read_text() == "the original"
    train_tokenizer([tmp_path / "a.txt"], vocab_size=300, out=tmp_path / "tok", progress=False)
    train_tokenizer([tmp_path / "a.txt"], vocab_size=300, out=tmp_path / "tok", progress=False)  # its own output: fine


@pytest.mark.parametrize("out, message", [("", "output path is empty"), ("afile/sub", "afile is a file"),
                                          ("afile", "afile is a file")])
def test_train_tokenizer_checks_its_output_before_training(tmp_path, monkeypatch, out, message):
    """Found after the training, an output that cannot be written costs the whole run."""
    (tmp_path / "a.txt").write_text("the cat sat on the mat\n" * 50)
    (tmp_path / "afile").write_text("")
    monkeypatch.chdir(tmp_path)

    def train(*args, **kwargs):
        raise AssertionError("trained before the output was checked")

    monkeypatch.setattr(Tokenizer, "train", train)
    with pytest.raises(UserError, match=message):
        train_tokenizer([tmp_path / "a.txt"], vocab_size=300, out=out, progress=False)


@pytest.mark.parametrize("extra", ["corpus.txt", "README.md", "vocab.json"])
def test_train_tokenizer_keeps_files_of_the_user_in_an_earlier_tokenizer_folder(tmp_path, monkeypatch, extra):
    """Seen in review: retraining into a tokenizer folder deleted everything but the two files it wrote
    there, the corpus it was training on (inside that folder) included."""
    (tmp_path / "a.txt").write_text("the cat sat on the mat\n" * 50)
    train_tokenizer([tmp_path / "a.txt"], vocab_size=300, out=tmp_path / "tok", progress=False)
    (tmp_path / "tok" / extra).write_text("the cat sat on the mat\n" * 50)

    def train(*args, **kwargs):
        raise AssertionError("trained before the output was checked")

    monkeypatch.setattr(Tokenizer, "train", train)
    source = tmp_path / "tok" / extra if extra == "corpus.txt" else tmp_path / "a.txt"
    message = "the source" if extra == "corpus.txt" else f"holds {extra}, which `lmforge tokenizer train` did not write"
    with pytest.raises(UserError, match=message):
        train_tokenizer([source], vocab_size=400, out=tmp_path / "tok", progress=False)
    assert sorted(p.name for p in (tmp_path / "tok").iterdir()) == sorted([extra, "tokenizer.json", "tokenizer_config.json"])


def test_a_gzip_file_that_is_not_utf8_is_converted_between_zcat_and_gzip(tmp_path):
    """Seen in review: the hint ran iconv over the compressed bytes."""
    (tmp_path / "c.txt.gz").write_bytes(gzip.compress(b"caf\xe9"))
    with pytest.raises(UserError, match=r"`zcat .*c\.txt\.gz \| iconv -f latin1 -t utf-8 \| gzip > .*c\.utf8\.txt\.gz`"):
        list(iter_documents([tmp_path / "c.txt.gz"]))


@pytest.mark.skipif(not all(shutil.which(t) for t in ("bash", "iconv", "zcat", "gzip")), reason="needs iconv, zcat, gzip")
@pytest.mark.parametrize("name", ["bad.jsonl", "bad.jsonl.gz", "bad.txt"])
def test_the_conversion_the_hint_gives_makes_a_file_read_as_the_original_would_be(tmp_path, name):
    """Seen in review: `x.jsonl > x.jsonl.utf8` gave a file read as plain text (the raw JSON one document),
    and one a directory's reading skipped. The command in the hint, run, gives the records."""
    raw = '{"text": "café"}\n{"text": "naïve"}\n'.encode("latin-1")
    (tmp_path / name).write_bytes(gzip.compress(raw) if name.endswith(".gz") else raw)
    with pytest.raises(UserError) as e:
        list(iter_documents([tmp_path / name]))
    command = str(e.value).split("`")[1]
    subprocess.run(["bash", "-c", command], check=True)
    converted = tmp_path / command.rsplit("> ", 1)[1].split("/")[-1]
    want = ["café", "naïve"] if "jsonl" in name else ['{"text": "café"}\n{"text": "naïve"}\n']
    assert texts([converted]) == want
    (tmp_path / name).unlink()  # the folder now holds the converted file alone: read, not skipped
    assert texts([tmp_path]) == want


def test_train_tokenizer_takes_one_path_as_prepare_does(tmp_path, monkeypatch):
    """Seen in review: one str was read as its characters (so "small.txt" put --out "inside the source ."),
    and one Path was a TypeError."""
    (tmp_path / "small.txt").write_text("the cat sat on the mat. " * 50)
    monkeypatch.chdir(tmp_path)
    assert train_tokenizer("small.txt", 300, "tok_str", progress=False).vocab_size > 256
    assert train_tokenizer(tmp_path / "small.txt", 300, tmp_path / "tok_path", progress=False).vocab_size > 256
