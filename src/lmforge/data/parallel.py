"""Parallel text for sequence-to-sequence training: line-aligned source and target files.

`prepare_parallel` tokenizes the pairs once into `OUT/{train,val}.pairs.jsonl` (token ids) with a
`meta.json` of kind "parallel"; `ParallelPairs` turns them into padded batches that are, like the
token windows of language modelling, a pure function of (seed, step, micro-batch).

    source ids + [eos]                 -> the encoder (padding masked)
    [start] + target ids               -> the decoder input (teacher forcing)
    target ids + [eos]                 -> the labels (padding ignored)
"""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmforge.data.corpus import open_bytes, reading
from lmforge.data.prepare import check_data_out
from lmforge.model.losses import IGNORE_INDEX
from lmforge.tokenizer import Tokenizer
from lmforge.utils.errors import UserError
from lmforge.utils.fs import atomic_dir, atomic_write_json, read_jsonl



def read_lines(path: str | Path) -> list[str]:
    """NFC-normalised lines of a UTF-8 text file, gzipped or not, without the byte order mark that
    Windows editors write before the first; a file that cannot be read is a one-line UserError naming it."""
    path = Path(path)
    with reading(path, "a line-aligned text file"), open_bytes(path) as f:
        raw = f.read()
    lines = raw.removeprefix(b"\xef\xbb\xbf").split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    out = []
    for number, line in enumerate(lines, 1):
        try:
            out.append(unicodedata.normalize("NFC", line.decode("utf-8").rstrip("\r")))
        except UnicodeDecodeError:
            raise UserError(f"{path}:{number} is not valid UTF-8; convert the file to UTF-8 (e.g. with iconv)") from None
    return out


def read_parallel(source: str | Path, target: str | Path) -> list[tuple[str, str]]:
    """Pairs of line-aligned files; misaligned or empty files are a UserError naming file and line."""
    src, tgt = read_lines(source), read_lines(target)
    if len(src) != len(tgt):
        (short, n), (long, m) = sorted([(source, len(src)), (target, len(tgt))], key=lambda file: file[1])
        ends = f"ends at line {n}" if n else "is empty"
        raise UserError(
            f"{short} {ends} but {long} has {m} lines ({long}:{n + 1} has no partner); parallel files must be line-aligned"
        )
    for number, (s, t) in enumerate(zip(src, tgt), 1):
        if not s.strip() or not t.strip():
            raise UserError(f"{source if not s.strip() else target}:{number} is empty; every line needs a sentence")
    if not src:
        raise UserError(f"{source} and {target} are empty; pass files with one sentence per line")
    return list(zip(src, tgt))


def decoder_start_id(tokenizer: Tokenizer) -> int:
    """The token a decoder starts from: the tokenizer's bos, else its cls, else end-of-text."""
    for i in (tokenizer.bos_id, tokenizer.cls_id, tokenizer.eot_id):
        if i is not None:
            return i
    raise AssertionError("a Tokenizer always has an end-of-text id")


def prepare_parallel(
    source: str | Path, target: str | Path, tokenizer: str | Path, out: str | Path, val_fraction: float = 0.05
) -> dict[str, Any]:
    """Tokenize aligned source/target files into OUT; the last `val_fraction` of the pairs is validation."""
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"val_fraction {val_fraction} is out of range; pass a value in [0, 1), e.g. 0.05")
    check_data_out(out, source, target)  # replaced wholesale: only an earlier data directory, never an input
    tok = Tokenizer.load(tokenizer)
    pairs = read_parallel(source, target)
    cut = len(pairs) - int(len(pairs) * val_fraction)
    src_ids = tok.encode_batch([s for s, _ in pairs])
    tgt_ids = tok.encode_batch([t for _, t in pairs])
    splits = {"train": range(0, cut), "val": range(cut, len(pairs))}
    meta: dict[str, Any] = {
        "format": 1, "kind": "parallel", "tokenizer_sha256": tok.sha256, "vocab_size": tok.vocab_size,
        "eot_id": tok.eot_id, "sources": [str(source), str(target)], "val_fraction": val_fraction, "splits": {},
    }
    with atomic_dir(out) as tmp:
        for name, rows in splits.items():
            with open(tmp / f"{name}.pairs.jsonl", "w", encoding="utf-8") as f:
                for i in rows:
                    f.write(json.dumps({"src": src_ids[i], "tgt": tgt_ids[i]}) + "\n")
            meta["splits"][name] = {
                "pairs": len(rows), "src_tokens": sum(len(src_ids[i]) for i in rows),
                "tgt_tokens": sum(len(tgt_ids[i]) for i in rows),
            }
        tok.save(tmp)
        atomic_write_json(tmp / "meta.json", meta)
    return meta


def pair_layout(src: list[int], tgt: list[int], max_len: int, eos: int, start: int) -> tuple[list[int], list[int], list[int]]:
    """An encoder-decoder's (encoder input, decoder input, labels) for one pair of token lists:
    `src <eos>` and teacher forcing `<start> tgt` -> `tgt <eos>`, each cut to `max_len` tokens.
    Pretraining (`ParallelPairs`) and fine-tuning (`TaskFormat.seq2seq`) share it."""
    tgt = tgt[: max_len - 1]
    return src[: max_len - 1] + [eos], [start] + tgt, tgt + [eos]


class ParallelPairs:
    """Tokenized pairs of one split, batched with padding (sequences longer than max_len are cut)."""

    def __init__(self, pairs: list[tuple[list[int], list[int]]], tokenizer: Tokenizer, max_len: int) -> None:
        self.pairs, self.max_len = pairs, max_len
        self.eos, self.start = tokenizer.eot_id, decoder_start_id(tokenizer)
        self.pad = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eot_id

    @classmethod
    def open(cls, data_dir: str | Path, split: str, tokenizer: Tokenizer, max_len: int) -> "ParallelPairs":
        path = Path(data_dir) / f"{split}.pairs.jsonl"
        if not path.is_file():
            raise UserError(f"{path} is missing; prepare parallel data with `lmforge prepare SRC --target TGT ...`")
        pairs = []
        for number, row, error in read_jsonl(path):
            if not (isinstance(row, dict) and isinstance(row.get("src"), list) and isinstance(row.get("tgt"), list)):
                why = error or "no src and tgt token lists"
                raise UserError(f"{path}:{number} is not a pair of token lists ({why}); the file is damaged, re-run "
                                f"`lmforge prepare SRC --target TGT --out {data_dir}`")
            pairs.append((row["src"], row["tgt"]))
        return cls(pairs, tokenizer, max_len)

    def __len__(self) -> int:
        return len(self.pairs)

    def batch(self, indices: np.ndarray) -> dict[str, torch.Tensor]:
        rows = [pair_layout(*self.pairs[i], self.max_len, self.eos, self.start) for i in indices]
        S, T = max(len(s) for s, _, _ in rows), max(len(x) for _, x, _ in rows)
        out = {
            "src": torch.full((len(rows), S), self.pad), "src_mask": torch.zeros(len(rows), S, dtype=torch.long),
            "input_ids": torch.full((len(rows), T), self.pad), "labels": torch.full((len(rows), T), IGNORE_INDEX),
        }
        for row, (s, x, y) in enumerate(rows):
            out["src"][row, : len(s)] = torch.tensor(s)
            out["src_mask"][row, : len(s)] = 1
            out["input_ids"][row, : len(x)] = torch.tensor(x)
            out["labels"][row, : len(y)] = torch.tensor(y)
        return out

    def random_batch(self, batch_size: int, seed: int, step: int, micro: int = 0) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([seed, step, micro, 2])
        return self.batch(rng.integers(0, len(self.pairs), size=batch_size))

    def first_batches(self, batch_size: int, n_batches: int) -> list[dict[str, torch.Tensor]]:
        n = min(batch_size * n_batches, len(self.pairs))
        return [self.batch(np.arange(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]

