"""Turning a corpus into token shards: the `lmforge prepare` verb, and reading the shards back.

A prepared data directory is self-describing:

    out/
      meta.json           format, tokenizer hash, dtype, per-split token/byte counts and shards
      tokenizer.json      the tokenizer the shards were made with
      train-00000.bin     raw little-endian token ids, <|endoftext|> after every document
      val-00000.bin       ...

The text is read as nanoGPT reads it with tiktoken: a literal end-of-text in it is the token (a
document boundary: TinyStories' .txt separates its stories by "<|endoftext|>"), any other special
token's text is plain text, so that a corpus that spells "<|mask|>" never holds the mask token.

Raw arrays (as nanoGPT's `train.bin`) because a trainer memory-maps them and slices random windows
without parsing anything; shards because one file per hundred million tokens is easy to copy.

Reading is two passes over the corpus: the first counts characters (and finds duplicates), because
the validation split is the *last* `val_fraction` of the text, and where that starts is only known
once the total is; the second tokenizes and writes. Two reads cost far less than holding a large
corpus in memory.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from tokenizers import pre_tokenizers
from tqdm import tqdm

from lmforge.data.corpus import iter_documents, path_list, text_key
from lmforge.tokenizer import Tokenizer
from lmforge.utils.errors import UserError
from lmforge.utils.fs import atomic_dir, atomic_write_json, check_only_outputs, check_replaceable, out_dir, relation

FORMAT = 1
SPLITS = ("train", "val")
# Chunks are the unit of parallel work for the Rust encoder; batches bound the memory held in
# Python lists of ids (about 8 bytes per character of text) between writes.
CHUNK_CHARS = 1 << 16
BATCH_CHARS = 1 << 22

# Where a document may be cut so that the pieces' encodings concatenate to the whole encoding: right
# after a '\n' that has non-whitespace on both sides ("word\n|Word"). The GPT-2 pre-tokenizer regex
# (`'s|'t|...| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`) has no look-behind, and a lone
# '\n' there is its own pre-token both in the whole text and at the end of a piece, so every
# pre-token is the same. Both neighbours matter: a run of two or more whitespace characters before
# non-whitespace is cut before its last character ("\n\nA" -> "\n", "\n", "A"), but at the end of a
# piece `(?!\S)` holds and the run stays whole ("\n\n"), a different token wherever "\n\n" is a
# merge (GPT-2's id 628). Text with only "\r\n" line ends has no such position and is encoded in one
# piece: slower, never different.
# Python's \s is a superset of Unicode White_Space, so a doubtful character only costs a boundary.
# All of this is about that regex on the raw text: see `chunks_encode_like_the_whole`.
_SAFE_BOUNDARY = re.compile(r"(?<=\S)\n(?=\S)")
# A file written to between the two passes: the cut and the duplicates were found in other text.
_CHANGED = "the corpus changed while it was being prepared; run prepare again"
# What `prepare` and `prepare_parallel` write into a data directory; it is replaced only when it
# holds nothing else (a run written into it, a user's notes would vanish with it).
_DATA_FILES = re.compile(r"meta\.json|tokenizer\.json|tokenizer_config\.json|generation_config\.json|(train|val)-\d{5,}\.bin"
                         r"|(train|val)\.pairs\.jsonl")


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned dtype that holds every id: uint16 up to 65536 tokens, else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def chunks_encode_like_the_whole(tok: Tokenizer) -> bool:
    """Whether `safe_chunks` holds for `tok`: a byte-level pre-tokenizer with GPT-2's regex that puts no
    space before a text, no normalizer, and no special token that takes the whitespace before it
    (lmforge's tokenizers, GPT-2's). Not a SentencePiece-style one (Llama 2, Mistral): its normalizer
    or Metaspace pre-tokenizer puts a '▁' before every text, so before every piece."""
    pre = tok.hf.pre_tokenizer
    return (tok.hf.normalizer is None and isinstance(pre, pre_tokenizers.ByteLevel) and pre.use_regex
            and not pre.add_prefix_space and not any(t.lstrip for t in tok.hf.get_added_tokens_decoder().values()))


def safe_chunks(text: str, chunk_chars: int) -> list[str]:
    """Cut `text` into pieces of at least `chunk_chars` characters (the last may be shorter) at safe
    boundaries only, so that concatenating the pieces' encodings gives the encoding of `text`."""
    pieces = []
    start = 0
    while len(text) - start > chunk_chars:
        match = _SAFE_BOUNDARY.search(text, start + chunk_chars - 1)
        if match is None:
            break
        pieces.append(text[start : match.end()])
        start = match.end()
    pieces.append(text[start:])
    return pieces


def prepare(
    paths: Sequence[str | Path],
    tokenizer: str | Path,
    out: str | Path,
    val_fraction: float = 0.1,
    shard_tokens: int = 100_000_000,
    progress: bool = True,
) -> dict[str, Any]:
    """Tokenize the corpus at `paths` into train/val shards in `out`; return the meta dict.

    Exact duplicate documents are dropped (the first copy stays). Validation is the last
    `val_fraction` of the characters, as nanoGPT holds out the end of tinyshakespeare: a held-out
    tail tests generalisation to unseen text rather than to shuffled neighbours of training lines.
    The document straddling the cut is split at the first line start at or after the cut (a
    position right after a newline): the same rule as for whole documents, where one starting
    exactly at the cut is all val.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"val_fraction {val_fraction} is out of range; pass a value in [0, 1), e.g. 0.1")
    if shard_tokens < 1:
        raise UserError(f"shard_tokens {shard_tokens} must be positive; pass e.g. 100000000")
    sources = [str(p) for p in path_list(paths)]
    check_data_out(out, *sources)
    out = Path(out)
    tok = Tokenizer.load(tokenizer)
    dtype = token_dtype(tok.vocab_size)
    with atomic_dir(out) as tmp:  # made now: a folder that cannot be written shows before the reading
        keep, total_chars, duplicates, last_line_start = _scan(paths, progress)
        if total_chars == 0:
            raise UserError(f"corpus {' '.join(sources) or '(no paths)'} is empty; pass files that contain text")
        # As nanoGPT's `data[:int(n*0.9)]`; with val_fraction 0 the cut is the end and val stays empty.
        cut = int(total_chars * (1.0 - val_fraction))
        if val_fraction > 0 and last_line_start < cut:
            raise UserError(_no_val(val_fraction))
        writers = {name: _SplitWriter(name, tmp, dtype, shard_tokens) for name in SPLITS}
        try:
            _tokenize(paths, keep, cut, total_chars, tok, writers, progress)
        finally:
            for writer in writers.values():
                writer.close()
        if writers["train"].tokens == 0:
            raise UserError(f"train split is empty: val_fraction {val_fraction} leaves no text for it; lower it")
        if val_fraction > 0 and writers["val"].tokens == 0:
            raise UserError(_no_val(val_fraction))
        meta = {
            "format": FORMAT,
            "tokenizer_sha256": tok.sha256,
            "vocab_size": tok.vocab_size,
            "eot_id": tok.eot_id,
            "dtype": dtype.name,
            "val_fraction": val_fraction,
            "documents": len(keep) - duplicates,
            "duplicates_dropped": duplicates,
            "sources": sources,
            "splits": {name: writer.summary() for name, writer in writers.items()},
        }
        tok.save(tmp)
        atomic_write_json(tmp / "meta.json", meta)
    return meta


def check_data_out(out: str | Path, *sources: str | Path) -> None:
    """`out` is about to be replaced wholesale: refuse unless it is absent, empty, or an earlier
    data directory that holds only what prepare writes (no checkpoints, no files of the user's),
    and none of `sources`, the text being prepared (an earlier output fed back in, as a corpus)."""
    out_dir(out)  # '' and the current directory are refused, by the name given
    out = Path(out)
    for source in sources:  # a corpus folder may hold --out (corpus/prepared); an --out holding an input would delete it
        how = relation(out, Path(source))
        if how in ("is", "holds"):
            raise UserError(f"--out {out} {how} the input {source}, which replacing the folder would delete; "
                            "pass an --out outside it")
    if (out / "meta.json").is_file():
        check_only_outputs(out, lambda entry: bool(_DATA_FILES.fullmatch(entry.name)) and entry.is_file(), "lmforge prepare",
                           "the data directory")
    check_replaceable(out, "meta.json", "a prepared data directory")


def _no_val(val_fraction: float) -> str:
    return (f"val split is empty: the last {val_fraction * 100:.3g}% of the text has no line start to split at; "
            "add more documents or lines, or pass --val-fraction 0 (val_fraction=0 in Python)")


def _scan(paths: Sequence[str | Path], progress: bool) -> tuple[bytearray, int, int, int]:
    """First pass: which documents to keep (first copies), their total characters, duplicates, and the
    last line start: the offset of the last kept document's start or of a position after one of its
    newlines with text after it. `_tokenize` puts text in val exactly when a line start lies at or
    after the cut, so an empty val split shows here, before the tokenizing."""
    seen: set[bytes] = set()
    keep = bytearray()  # one byte per document, not a list's eight
    total_chars = last_line_start = 0
    for doc in tqdm(iter_documents(paths), desc="reading", unit=" docs", file=sys.stderr, disable=not progress):
        key = text_key(doc.text)
        keep.append(key not in seen)
        if keep[-1]:
            seen.add(key)
            last_line_start = total_chars + doc.text.rfind("\n", 0, len(doc.text) - 1) + 1  # rfind -1: the start
            total_chars += len(doc.text)
    return keep, total_chars, keep.count(0), last_line_start


def _tokenize(
    paths: Sequence[str | Path],
    keep: bytearray,
    cut: int,
    total_chars: int,
    tok: Tokenizer,
    writers: dict[str, _SplitWriter],
    progress: bool,
) -> None:
    """Second pass: split the kept documents at `cut` into train/val parts and write their tokens."""
    pending: list[tuple[str, str]] = []  # (split, part) waiting for the next batch
    pending_chars = 0
    pos = 0
    chunk_chars = CHUNK_CHARS if chunks_encode_like_the_whole(tok) else None
    bar = tqdm(
        total=total_chars, desc="tokenizing", unit="char", unit_scale=True, file=sys.stderr, disable=not progress
    )
    with bar:
        n = 0
        for n, doc in enumerate(iter_documents(paths), 1):
            if n > len(keep):
                raise UserError(_CHANGED)
            if not keep[n - 1]:
                continue
            text, start = doc.text, pos
            pos += len(text)
            if pos <= cut:
                parts = [("train", text)]
            elif start >= cut:
                parts = [("val", text)]
            else:
                # cut - start >= 1 here; a '\n' just before the cut makes the cut itself a line start.
                newline = text.find("\n", cut - start - 1)
                at = len(text) if newline == -1 else newline + 1
                parts = [("train", text[:at]), ("val", text[at:])]
            for split, part in parts:
                if part:
                    pending.append((split, part))
                    pending_chars += len(part)
            if pending_chars >= BATCH_CHARS:
                _encode_and_write(pending, tok, writers, bar, chunk_chars)
                pending, pending_chars = [], 0
        if n != len(keep) or pos != total_chars:
            raise UserError(_CHANGED)
        _encode_and_write(pending, tok, writers, bar, chunk_chars)


def _encode_and_write(
    pending: list[tuple[str, str]], tok: Tokenizer, writers: dict[str, _SplitWriter], bar: tqdm, chunk_chars: int | None
) -> None:
    """Encode all parts of a batch in one multi-threaded call, then append each part's ids + eot. A part
    longer than `chunk_chars` is encoded in safe chunks; with None, whole."""
    chunks: list[str] = []
    counts: list[int] = []
    for _, part in pending:
        pieces = safe_chunks(part, chunk_chars) if chunk_chars else [part]
        chunks.extend(pieces)
        counts.append(len(pieces))
    encoded = iter(tok.encode_batch(chunks, eot_only=True))
    ids: dict[str, list[int]] = {name: [] for name in writers}
    for (split, part), count in zip(pending, counts):
        for _ in range(count):
            ids[split].extend(next(encoded))
        ids[split].append(tok.eot_id)
        writers[split].count_document(part)
    for name, writer in writers.items():
        writer.write(np.array(ids[name], dtype=writer.dtype))
    bar.update(sum(len(part) for _, part in pending))


class _SplitWriter:
    """Appends one split's tokens to `<split>-NNNNN.bin` files of at most `shard_tokens` tokens."""

    def __init__(self, name: str, directory: Path, dtype: np.dtype, shard_tokens: int):
        self.name, self.directory, self.dtype, self.shard_tokens = name, directory, dtype, shard_tokens
        self.tokens = self.bytes = self.documents = 0
        self.shards: list[dict[str, Any]] = []
        self._file = None

    def count_document(self, text: str) -> None:
        self.documents += 1
        self.bytes += len(text.encode("utf-8"))

    def write(self, ids: np.ndarray) -> None:
        ids = ids.astype(self.dtype.newbyteorder("<"), copy=False)
        while len(ids):
            if self._file is None or self.shards[-1]["tokens"] == self.shard_tokens:
                self._next_shard()
            take = min(len(ids), self.shard_tokens - self.shards[-1]["tokens"])
            ids[:take].tofile(self._file)
            self.shards[-1]["tokens"] += take
            self.tokens += take
            ids = ids[take:]

    def _next_shard(self) -> None:
        self.close()
        name = f"{self.name}-{len(self.shards):05d}.bin"
        self._file = open(self.directory / name, "wb")
        self.shards.append({"file": name, "tokens": 0})

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def summary(self) -> dict[str, Any]:
        return {
            "tokens": self.tokens,
            "bytes": self.bytes,
            "documents": self.documents,
            "bytes_per_token": round(self.bytes / self.tokens, 4) if self.tokens else None,
            "shards": self.shards,
        }


def load_meta(data_dir: str | Path) -> dict[str, Any]:
    """The `meta.json` of a prepared data directory."""
    data_dir = Path(data_dir)
    path = data_dir / "meta.json"
    if not path.is_file():
        raise UserError(
            f"{data_dir} is not a prepared data directory (no meta.json); "
            f"run `lmforge prepare ... --out {data_dir}` first"
        )
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is unreadable ({e}); re-run `lmforge prepare ... --out {data_dir}`") from None
    if not isinstance(meta, dict):
        raise UserError(f"{path} holds a JSON {type(meta).__name__}, not a data description; "
                        f"re-run `lmforge prepare ... --out {data_dir}`")
    if meta.get("format") != FORMAT:
        raise UserError(
            f"{path} has data format {meta.get('format')!r}, this lmforge reads format {FORMAT}; "
            f"re-run `lmforge prepare ... --out {data_dir}`"
        )
    problem = _meta_problem(meta)
    if problem:
        raise UserError(f"{path} is damaged ({problem}); re-run `lmforge prepare ... --out {data_dir}`")
    return meta


def _meta_problem(meta: dict[str, Any]) -> str | None:
    """What a meta.json lacks of what its readers index without checking; None when it is whole.

    Both kinds of data directory: token shards, and parallel pairs (`lmforge.data.parallel`).
    """
    def count(x: Any) -> bool:
        return type(x) is int and x >= 0

    if not count(meta.get("vocab_size")):
        return "no vocab_size"
    splits = meta.get("splits")
    if not isinstance(splits, dict):
        return "no splits"
    parallel = meta.get("kind") == "parallel"
    for name in SPLITS:  # prepare writes both, an empty val included
        split = splits.get(name)
        if not isinstance(split, dict):
            return f"no {name} split"
        for key in ("pairs", "src_tokens", "tgt_tokens") if parallel else ("tokens", "bytes"):
            if not count(split.get(key)):
                return f"the {name} split has no {key} count"
        shards = [] if parallel else split.get("shards")
        if not isinstance(shards, list) or not all(
            isinstance(s, dict) and isinstance(s.get("file"), str) and Path(s["file"]).name == s["file"]
            and count(s.get("tokens")) for s in shards
        ):
            return f"the {name} split's shard list is malformed"
    if not parallel:
        try:
            unsigned = np.dtype(meta.get("dtype")).kind == "u"
        except (TypeError, ValueError):  # not a dtype at all
            unsigned = False
        if not unsigned:
            return f"dtype {meta.get('dtype')!r} is not an unsigned integer type such as uint16"
    return None


def open_split(data_dir: str | Path, split: str) -> list[np.memmap]:
    """Read-only memory maps of a split's shards, in order; each shard's size is checked against meta."""
    data_dir = Path(data_dir)
    meta = load_meta(data_dir)
    if meta.get("kind") == "parallel":
        raise UserError(f"{data_dir} holds parallel pairs (prepared with --target), not token shards; "
                        "prepare the text without --target")
    if split not in meta["splits"]:
        raise UserError(f"unknown split {split!r}; choose one of {', '.join(meta['splits'])}")
    info = meta["splits"][split]
    if info["tokens"] == 0:
        raise UserError(
            f"{data_dir} has no {split} tokens (prepared with val_fraction={meta['val_fraction']}); "
            f"re-run `lmforge prepare ... --out {data_dir}` with a val fraction such as 0.1"
        )
    dtype = np.dtype(meta["dtype"]).newbyteorder("<")
    maps = []
    for shard in info["shards"]:
        path = data_dir / shard["file"]
        expected = shard["tokens"] * dtype.itemsize
        size = path.stat().st_size if path.is_file() else None
        if size != expected:
            found = "missing" if size is None else f"{size} bytes, expected {expected}"
            raise UserError(f"shard {path} is {found}; re-run `lmforge prepare ... --out {data_dir}`")
        maps.append(np.memmap(path, dtype=dtype, mode="r", shape=(shard["tokens"],)))
    return maps
