import gzip
import json

import numpy as np
import pytest

from lmforge.data import load_meta, prepare_parallel, read_parallel
from lmforge.data.parallel import ParallelPairs
from lmforge.model.losses import IGNORE_INDEX as IGNORE
from lmforge.tokenizer import Tokenizer
from lmforge.utils.errors import UserError


def test_pairs_from_plain_and_gzipped_files(tmp_path):
    (tmp_path / "a.en").write_text("one\ntwo\r\ncafe\u0301\n")
    with gzip.open(tmp_path / "a.de.gz", "wt", encoding="utf-8") as f:
        f.write("eins\nzwei\ndrei\n")
    assert read_parallel(tmp_path / "a.en", tmp_path / "a.de.gz") == [("one", "eins"), ("two", "zwei"), ("café", "drei")]


def test_a_byte_order_mark_is_not_part_of_the_first_line(tmp_path):
    """As corpus files and the task readers drop it: else the first source starts with U+FEFF."""
    (tmp_path / "a.en").write_bytes(b"\xef\xbb\xbfone\ntwo\n")
    with gzip.open(tmp_path / "a.de.gz", "wb") as f:
        f.write(b"\xef\xbb\xbfeins\nzwei\n")
    assert read_parallel(tmp_path / "a.en", tmp_path / "a.de.gz") == [("one", "eins"), ("two", "zwei")]


def test_misaligned_empty_and_missing(tmp_path):
    (tmp_path / "s").write_text("a\nb\nc\n")
    (tmp_path / "t").write_text("x\ny\n")
    with pytest.raises(UserError, match=r"t ends at line 2 but .*s has 3 lines \(.*s:3 has no partner\); parallel files"):
        read_parallel(tmp_path / "s", tmp_path / "t")
    with pytest.raises(UserError, match=r"t ends at line 2 but .*s has 3 lines \(.*s:3 has no partner\)"):
        read_parallel(tmp_path / "t", tmp_path / "s")  # either order
    (tmp_path / "none").write_text("")
    with pytest.raises(UserError, match=r"none is empty but .*s has 3 lines \(.*s:1 has no partner\)"):
        read_parallel(tmp_path / "s", tmp_path / "none")
    (tmp_path / "t").write_text("x\n\nz\n")
    with pytest.raises(UserError, match=r"t:2 is empty"):
        read_parallel(tmp_path / "s", tmp_path / "t")
    with pytest.raises(UserError, match="does not exist"):
        read_parallel(tmp_path / "s", tmp_path / "nope")


def test_a_bad_gzip_file_or_a_directory_is_named(tmp_path):
    (tmp_path / "s.txt").write_text("a\nb\n")
    (tmp_path / "fake.txt.gz").write_bytes(b"a\nb\n")  # a .gz name on plain text
    with pytest.raises(UserError, match=r"fake\.txt\.gz is not a valid gzip file"):
        read_parallel(tmp_path / "s.txt", tmp_path / "fake.txt.gz")
    with gzip.open(tmp_path / "cut.txt.gz", "wb") as f:
        f.write(b"a\nb\n" * 1000)
    (tmp_path / "cut.txt.gz").write_bytes((tmp_path / "cut.txt.gz").read_bytes()[:-12])  # truncated
    with pytest.raises(UserError, match=r"cut\.txt\.gz is not a valid gzip file"):
        read_parallel(tmp_path / "cut.txt.gz", tmp_path / "s.txt")
    (tmp_path / "d").mkdir()
    with pytest.raises(UserError, match=r"d is a directory; pass a line-aligned text file"):
        read_parallel(tmp_path / "s.txt", tmp_path / "d")


def test_batches_pad_and_shift(tmp_path, tokenizer_dir):
    (tmp_path / "s").write_text("to be\nor not to be\n")
    (tmp_path / "t").write_text("sein\noder nicht sein\n")
    meta = prepare_parallel(tmp_path / "s", tmp_path / "t", tokenizer_dir, tmp_path / "data", val_fraction=0)
    assert meta["kind"] == "parallel" and meta["splits"]["train"]["pairs"] == 2
    tok = Tokenizer.load(tmp_path / "data")
    b = ParallelPairs.open(tmp_path / "data", "train", tok, max_len=32).batch(np.array([0, 1]))
    src0, tgt1 = tok.encode("to be"), tok.encode("oder nicht sein")
    assert b["src"][0, : len(src0) + 1].tolist() == src0 + [tok.eot_id] and b["src_mask"][0].sum() == len(src0) + 1
    assert b["input_ids"][1, : len(tgt1) + 1].tolist() == [tok.cls_id] + tgt1  # decoding starts from <|cls|>
    assert b["labels"][1, : len(tgt1) + 1].tolist() == tgt1 + [tok.eot_id]
    assert (b["labels"][0, len(tok.encode("sein")) + 1 :] == IGNORE).all()  # padding carries no loss


def test_prepare_parallel_replaces_only_its_own_earlier_output(tmp_path, tokenizer_dir):
    (tmp_path / "s").write_text("to be\nor not to be\n")
    (tmp_path / "t").write_text("sein\noder nicht sein\n")
    prepare_parallel(tmp_path / "s", tmp_path / "t", tokenizer_dir, tmp_path / "data", val_fraction=0)
    prepare_parallel(tmp_path / "s", tmp_path / "t", tokenizer_dir, tmp_path / "data", val_fraction=0)  # again: fine
    (tmp_path / "data" / "run").mkdir()
    (tmp_path / "data" / "run" / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(UserError, match="holds run, which `lmforge prepare` did not write"):
        prepare_parallel(tmp_path / "s", tmp_path / "t", tokenizer_dir, tmp_path / "data", val_fraction=0)
    assert (tmp_path / "data" / "run" / "metrics.jsonl").exists()


def test_prepare_parallel_never_replaces_a_folder_holding_its_input(tmp_path, tokenizer_dir):
    (tmp_path / "s").write_text("to be\nor not to be\n")
    (tmp_path / "t").write_text("sein\noder nicht sein\n")
    prepare_parallel(tmp_path / "s", tmp_path / "t", tokenizer_dir, tmp_path / "data", val_fraction=0)
    pairs = tmp_path / "data" / "train.pairs.jsonl"  # an earlier output fed back in as the target
    before = pairs.read_bytes()
    with pytest.raises(UserError, match=rf"^--out {tmp_path / 'data'} holds the input {pairs}, which replacing the folder "
                                        "would delete; pass an --out outside it$"):
        prepare_parallel(tmp_path / "s", pairs, tokenizer_dir, tmp_path / "data", val_fraction=0)
    assert pairs.read_bytes() == before


def test_damaged_parallel_data_is_one_line_naming_the_file(tmp_path, tokenizer_dir):
    """A pairs file cut short (a full disk, a partial copy), or a meta.json that is not a JSON object."""
    (tmp_path / "s").write_text("to be\nor not to be\nthat is\n")
    (tmp_path / "t").write_text("sein\noder nicht sein\ndas ist\n")
    prepare_parallel(tmp_path / "s", tmp_path / "t", tokenizer_dir, tmp_path / "data", val_fraction=0)
    tok = Tokenizer.load(tmp_path / "data")
    pairs = tmp_path / "data" / "train.pairs.jsonl"
    text = pairs.read_text()
    pairs.write_text(text[: len(text) - 8])
    with pytest.raises(UserError, match=r"train.pairs.jsonl:3 is not a pair of token lists \(.*\); the file is damaged, re-run"):
        ParallelPairs.open(tmp_path / "data", "train", tok, max_len=32)
    pairs.write_text(text.replace('"tgt"', '"TGT"', 1))
    with pytest.raises(UserError, match=r"train.pairs.jsonl:1 is not a pair of token lists \(no src and tgt token lists\)"):
        ParallelPairs.open(tmp_path / "data", "train", tok, max_len=32)
    meta = tmp_path / "data" / "meta.json"
    meta.write_text("[]")
    with pytest.raises(UserError, match=r"meta.json holds a JSON list, not a data description"):
        load_meta(tmp_path / "data")
    meta.write_text(json.dumps({"format": 1, "kind": "parallel", "vocab_size": 512, "splits": {"train": {"pairs": 3}}}))
    with pytest.raises(UserError, match=r"meta.json is damaged \(the train split has no src_tokens count\)"):
        load_meta(tmp_path / "data")
