"""Reading a text corpus: files and directories in, NFC-normalised documents out.

What counts as a document decides where `<|endoftext|>` goes, so it is fixed here once:
a `.txt`/`.md` file is one document (a book stays whole), a `.jsonl` line is one document (its
`text` field). Any of them may be gzipped. Empty documents are skipped: they carry no text.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
import re
import unicodedata
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator, Sequence

from lmforge.tokenizer import Tokenizer
from lmforge.utils.errors import UserError
from lmforge.utils.fs import atomic_dir, check_only_outputs, check_replaceable, check_writable_dir

TEXT_SUFFIXES = (".txt", ".md")
JSONL_SUFFIX = ".jsonl"
# JSON may spell half of a UTF-16 surrogate pair alone ("\ud83d"); json.loads gives it back as a lone
# surrogate code point, which no UTF-8 text (and so no tokenizer) can hold.
_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass(frozen=True, slots=True)
class Document:
    """One unit of text; `source` is the file, or `file:line` for a `.jsonl` record."""

    source: str
    text: str


def iter_documents(paths: Sequence[str | Path]) -> Iterator[Document]:
    """Yield the documents of `paths` in order; directories are walked recursively, sorted.

    Every path is checked before the first document is read, so a typo in the last argument
    fails at once rather than after an hour of reading.
    """
    files = [file for path in path_list(paths) for file in _expand(path)]
    for file in files:
        yield from _read_file(file)


def train_tokenizer(
    paths: Sequence[str | Path] | str | Path,
    vocab_size: int,
    out: str | Path,
    min_frequency: int = 2,
    progress: bool = True,
) -> Tokenizer:
    """Train a byte-level BPE tokenizer on the deduplicated documents of `paths`; save `out/tokenizer.json`.

    Duplicates are dropped because a document repeated a thousand times would otherwise buy
    merges for its own phrases. `out` is replaced as a whole, so that a failure leaves the earlier
    tokenizer there complete; it may not be a prepared data or checkpoint directory (its shards or
    weights were made with the tokenizer.json there) nor a folder of other files.
    """
    paths = path_list(paths)  # one str or Path is one path, as `prepare` takes it
    check_tokenizer_out(out, sources=paths)
    n_docs = 0

    def texts() -> Iterator[str]:
        nonlocal n_docs
        seen: set[bytes] = set()
        for doc in iter_documents(paths):
            key = text_key(doc.text)
            if key not in seen:
                seen.add(key)
                n_docs += 1
                yield doc.text

    # tokenizer.json and tokenizer_config.json go together: a disk filling up or a config that cannot be
    # replaced between the two would leave a new tokenizer beside the old one's special tokens.
    with atomic_dir(out) as tmp:  # made now: a parent that cannot be written shows before the training
        tokenizer = Tokenizer.train(texts(), vocab_size, min_frequency=min_frequency, show_progress=progress)
        if n_docs == 0:
            raise UserError(f"corpus {_names(paths)} is empty; pass files that contain text")
        tokenizer.save(tmp)
    return tokenizer


# What `Tokenizer.save` writes: an earlier tokenizer folder holding anything else (the corpus, notes,
# a downloaded tokenizer's vocab.json) is the user's, which replacing the folder would delete.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")  # what Tokenizer.save writes


def check_tokenizer_out(out: str | Path, sources: Sequence[str | Path] = ()) -> None:
    """Before training, refuse an `out` that could not take the tokenizer (an empty path, a file in the
    way, a folder that cannot be written), that is or holds one of the `sources` (the corpus), whose
    tokenizer.json belongs to shards (meta.json) or to weights (a checkpoint), or that holds anything
    but an earlier tokenizer's files: found after the training, the run would be lost."""
    check_writable_dir(out)
    out = Path(out)
    if (out / "meta.json").exists():
        what = "prepared data (meta.json): its shards"
    elif (out / "config.json").exists() or any(out.glob("*.safetensors")) or (out / "pytorch_model.bin").exists():
        what = "a checkpoint (config.json or weights): its weights"
    else:
        check_replaceable(out, "tokenizer.json", "a tokenizer directory", sources=sources)
        if out.is_dir():
            check_only_outputs(out, lambda entry: entry.name in _TOKENIZER_FILES and entry.is_file(),
                               "lmforge tokenizer train", "the tokenizer folder")
        return
    raise UserError(f"{out} holds {what} were made with the tokenizer.json there, which a new "
                    "tokenizer would replace; pass another --out")


def text_key(text: str) -> bytes:
    """A 128-bit digest identifying a document's text, for exact deduplication."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


def path_list(paths: Sequence[str | Path] | str | Path) -> list[Path]:
    """`paths` as a list; a lone str or Path is one path (not a sequence of one-letter paths, which
    would turn "/data/a.txt" into "/", "d", ... and walk the whole filesystem)."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    for p in paths:
        if str(p) == "":  # an unset variable: Path("") is the current directory, which would be walked
            raise UserError("an input path is empty (an unset variable?); pass the corpus files or directories")
    return [Path(p) for p in paths]


def _names(paths: Sequence[str | Path]) -> str:
    return " ".join(str(p) for p in path_list(paths)) or "(no paths)"


def _kind(path: Path) -> str | None:
    """'text', 'jsonl' or None (not a corpus file) from the suffix, looking inside `.gz`."""
    suffixes = [s.lower() for s in path.suffixes]
    suffixes = suffixes[-2:] if suffixes[-1:] == [".gz"] else suffixes[-1:]
    inner = suffixes[0] if suffixes and suffixes[0] != ".gz" else ""
    if inner == JSONL_SUFFIX:
        return "jsonl"
    if inner in TEXT_SUFFIXES:
        return "text"
    return None


def _expand(path: Path) -> list[Path]:
    """The corpus files `path` stands for: itself, or the corpus files found below a directory."""
    if path.is_file():
        return [path]
    if not path.exists():
        raise UserError(f"{path} does not exist; check the path")
    if not path.is_dir():
        raise UserError(f"{path} is not a regular file or directory; pass text files or directories")
    # Hidden entries (.git, editor swap files) are never corpus text.
    files = sorted(
        p
        for p in path.rglob("*")
        if p.is_file() and _kind(p) is not None and not any(s.startswith(".") for s in p.relative_to(path).parts)
    )
    if not files:
        raise UserError(
            f"directory {path} has no .txt, .md or .jsonl files (optionally .gz); "
            "pass the files explicitly or a directory that holds them"
        )
    return files


def open_bytes(file: Path) -> BinaryIO:
    """A file's bytes, decompressed when its name ends in .gz."""
    return gzip.open(file, "rb") if file.suffix.lower() == ".gz" else open(file, "rb")


@contextlib.contextmanager
def reading(path: Path, what: str = "a data file") -> Iterator[None]:
    """Around reading `path` (with `open_bytes`): a directory, a missing file, a broken gzip stream
    or a failed read is a one-line UserError naming `path`; `what` is what to pass instead."""
    if path.is_dir():
        raise UserError(f"{path} is a directory; pass {what}")
    if not path.is_file():
        raise UserError(f"{path} does not exist or is not a file; pass {what}")
    try:
        yield
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise UserError(f"{path} is not a valid gzip file ({e}); re-compress it with gzip, or decompress it") from None
    except OSError as e:
        raise UserError(f"cannot read {path} ({e.strerror or e}); check that it is readable") from None


def _read_file(file: Path) -> Iterator[Document]:
    """Documents of one file, with every read or decode failure turned into a one-line UserError."""
    with reading(file), open_bytes(file) as f:
        if _kind(file) == "jsonl":
            yield from _read_jsonl(file, f)
        else:
            text = _decode(f.read(), file, 0)
            text = _nfc(text.removeprefix("\ufeff"))
            if text:
                yield Document(str(file), text)


def _read_jsonl(file: Path, f: BinaryIO) -> Iterator[Document]:
    """One document per line, streamed so that a many-GB .jsonl never sits in memory at once."""
    offset = 0
    hint = 'each line must be a JSON object with a string "text" field'
    for lineno, raw in enumerate(f, start=1):
        line = _decode(raw, file, offset)
        offset += len(raw)
        if lineno == 1:
            line = line.removeprefix("\ufeff")
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{file}:{lineno}: invalid JSON ({e.msg}, column {e.colno}); {hint}") from None
        if not isinstance(record, dict) or "text" not in record:
            raise UserError(f'{file}:{lineno}: no "text" field; {hint}')
        if not isinstance(record["text"], str):
            raise UserError(f'{file}:{lineno}: "text" is {type(record["text"]).__name__}, not a string; {hint}')
        if "\\u" in line and (lone := _SURROGATE.search(record["text"])):  # only a \u escape can spell one
            raise UserError(f'{file}:{lineno}: "text" is not valid Unicode: an unpaired surrogate '
                            f'(\\u{ord(lone.group()):04x} at character {lone.start()}); write the whole pair '
                            '(an emoji is two \\u escapes) or remove it')
        text = _nfc(record["text"])
        if text:
            yield Document(f"{file}:{lineno}", text)


def _decode(data: bytes, file: Path, offset: int) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        gz = file.suffix.lower() == ".gz"
        where = "of the decompressed text " if gz else ""
        bad = data[e.start : e.start + 4]
        # The conversion is of the text: a compressed file is converted between zcat and gzip. The new
        # name keeps the suffixes that say how to read it (x.jsonl.gz -> x.utf8.jsonl.gz).
        inner = file.with_suffix("") if gz else file
        to = inner.with_name(f"{inner.stem}.utf8{inner.suffix}")
        convert = (f"zcat {file} | iconv -f latin1 -t utf-8 | gzip > {to}.gz" if gz
                   else f"iconv -f latin1 -t utf-8 {file} > {to}")
        raise UserError(
            f"{file} is not valid UTF-8 (byte offset {offset + e.start} {where}is {bad!r}); convert it, "
            f"e.g. `{convert}` if it is Latin-1"
        ) from None


def _nfc(text: str) -> str:
    """NFC, so that 'é' typed as one code point or as 'e' + U+0301 becomes the same tokens."""
    return unicodedata.normalize("NFC", text)
