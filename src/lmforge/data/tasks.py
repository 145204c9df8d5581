"""Task data for fine-tuning and evaluation: classification, tagging, extractive QA, text-to-text, chat.

Every reader returns a list of small frozen dataclasses, each with a `where` ("FILE:LINE", or
"FILE: question ID" for SQuAD) so that a later error can point at the line that caused it. Files may
be gzipped. Input that cannot be right (an empty file, a missing column, a tag that is not IOB2, an
answer that is not where its offset says) is a one-line `UserError` naming the file and the line.
Labels (a class, tags, answers, a target, an assistant reply) are required, except with
`require_labels=False` (`predict`).

    format                     reader                 example
    TSV / CSV / JSONL          read_classification    ClassifyExample(text, label)
    CoNLL / IOB2               read_tagged            TaggedExample(tokens, tags)
    SQuAD v1.1 JSON            read_squad             QAExample(id, title, context, question, answers)
    JSONL / CSV, line pairs,   read_text2text,        Text2TextExample(source, target, references)
    plain text (sources only)  read_parallel_text
    JSONL of messages          read_chat              ChatExample(messages)
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import shlex
import sys
import unicodedata
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge.data.corpus import open_bytes, reading
from lmforge.data.parallel import read_lines, read_parallel
from lmforge.utils.errors import UserError

TEXT_FIELDS = ("text", "sentence")
LABEL_FIELDS = ("label",)
SOURCE_FIELDS = ("source", "src", "input")
TARGET_FIELDS = ("target", "tgt", "output")
ROLES = ("system", "user", "assistant")
_IOB2 = re.compile(r"(O|[BI]-.+)")
# A JSON escape such as "\ud83d" without its pair decodes to a lone surrogate: a str that no
# tokenizer takes and that cannot be written out as UTF-8.
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")

# (where the row is, where its column names are: the header line or the row itself, the row)
Rows = Iterator[tuple[str, str, dict]]


@dataclass(frozen=True, slots=True)
class ClassifyExample:
    text: str
    label: str | None  # None only for unlabelled data read with require_labels=False
    where: str


@dataclass(frozen=True, slots=True)
class TaggedExample:
    tokens: list[str]
    tags: list[str] | None  # None only for a tokens-only file read with require_labels=False
    where: str


@dataclass(frozen=True, slots=True)
class QAExample:
    id: str
    title: str
    context: str
    question: str
    answers: list[tuple[str, int]]  # (text, character offset into context); [] only with require_labels=False
    where: str


@dataclass(frozen=True, slots=True)
class Text2TextExample:
    source: str
    target: str | None  # the first reference: what a model is trained towards; None only with require_labels=False
    references: list[str]  # all of them: what it is scored against; [] only with require_labels=False
    where: str


@dataclass(frozen=True, slots=True)
class ChatExample:
    messages: list[dict[str, str]]  # [{"role": ..., "content": ...}, ...]
    where: str


# --- classification ---------------------------------------------------------------------------


def read_classification(
    path: str | Path,
    text_field: str | None = None,
    label_field: str | None = None,
    labels: Sequence[str] | None = None,
    require_labels: bool = True,
) -> list[ClassifyExample]:
    """Text/label pairs from a TSV (with a header, or headerless `text<TAB>label`), a CSV with a header,
    or a JSONL file (by its name, .jsonl or .json, or by its first line, as read_text2text tells it).
    Columns default to `text` or `sentence`, and `label`; labels are strings.

    `labels`, when given, is the closed label set: any other label is an error naming file:line.
    `require_labels=False` reads unlabelled data (GLUE test.tsv) with label None, and also reads an
    empty or null label as None.
    """
    path = Path(path)
    allowed = None if labels is None else [str(label) for label in labels]
    if _inner_suffix(path) == ".csv":
        rows = _csv_rows(path)
    else:
        lines = read_lines(path)
        rows = _jsonl_rows(path, lines) if _is_jsonl(path, lines) else _tsv_rows(path, lines, text_field, label_field, allowed)
    out = []
    for where, columns_at, row in rows:
        text_key = _pick(row, text_field, TEXT_FIELDS, columns_at, "text", "text_field")
        text = _string(row[text_key], where, text_key)
        label_key = _pick(row, label_field, LABEL_FIELDS, columns_at, "label", "label_field", required=require_labels)
        unlabelled = label_key is None or (not require_labels and _blank(row[label_key]))
        label = None if unlabelled else _label(row[label_key], where, label_key)
        if allowed is not None and label is not None and label not in allowed:
            raise UserError(
                f"{where}: label {label!r} is not one of {', '.join(allowed)}; fix the line or add it to --labels"
            )
        out.append(ClassifyExample(text, label, where))
    if out and all(e.label is not None and _IOB2.fullmatch(e.label) for e in out) and any(e.label != "O" for e in out) \
            and not any(" " in e.text for e in out):
        raise UserError(f"{path} holds one word and its IOB2 tag per line, a tagging file (CoNLL), not TEXT<TAB>LABEL; "
                        "tag its words with the tag task (--task tag)")
    return _nonempty(out, path)


def _tsv_rows(path: Path, lines: list[str], text_field: str | None, label_field: str | None,
              known: Sequence[str] | None = None) -> Rows:
    """Rows of a TSV. The first line is a header when it names a known column (GLUE's `sentence\\tlabel`);
    otherwise every line is `text<TAB>label` (the UCI sentiment files), and a first line that looks
    like a header of other names is refused (see _unnamed_header). Fields are split on tabs only,
    without quoting, as GLUE's own readers do: a `"` in a sentence is just a character."""
    header_line = next((i for i, line in enumerate(lines, 1) if line.strip()), None)
    if header_line is None:
        raise UserError(f"{path} is empty; pass a file with one example per line")
    first = lines[header_line - 1]
    names = {text_field, label_field, *TEXT_FIELDS, *LABEL_FIELDS} - {None}
    header = [name.strip() for name in first.split("\t")]
    if not names & set(header):
        if text_field or label_field:
            raise UserError(
                f"{path}:{header_line} is not a header naming {text_field or label_field!r}; pass a TSV with a header row, "
                "or leave text_field/label_field unset for headerless TEXT<TAB>LABEL lines"
            )
        header = []
    headerless = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip() or (header and lineno == header_line):
            continue
        fields = line.split("\t")
        where = f"{path}:{lineno}"
        if not header:
            if len(fields) != 2:
                raise UserError(f"{where} has {len(fields)} tab-separated fields; expected TEXT<TAB>LABEL")
            headerless.append((where, where, {"text": fields[0], "label": fields[1]}))
        elif len(fields) != len(header):
            raise UserError(f"{where} has {len(fields)} tab-separated fields but the header has {len(header)}; fix the line")
        else:
            yield where, f"{path}:{header_line}", dict(zip(header, fields))
    if headerless:
        text, label = (f.strip() for f in first.split("\t"))
        labels = [row["label"].strip() for *_, row in headerless]
        if label not in (known or ()) and _unnamed_header(labels):
            raise UserError(
                f"{path}:{header_line} looks like a header (its label {label!r} is a word, every other label a number); "
                f"name its columns with --text-field {shlex.quote(text)} --label-field {shlex.quote(label)} "
                f"(in Python: text_field={text!r}, label_field={label!r})"
            )
    yield from headerless


def _unnamed_header(labels: list[str]) -> bool:
    """Whether the first line of a headerless TSV, whose labels are `labels`, is surely a header of
    unknown names (`review<TAB>sentiment` over 0/1): its label a word that occurs on no other line,
    every other label an integer. Anything less certain is read as an example, since a headerless
    file has no way to say that its first line is one."""
    first, rest = labels[0], labels[1:]
    return bool(first) and bool(rest) and not _integer(first) and all(_integer(label) for label in rest)


def _integer(text: str) -> bool:
    return text.removeprefix("-").isdigit()


def _csv_rows(path: Path) -> Rows:
    """Rows of a CSV with a header; `where` is the line a row starts on (a quoted field may span lines)."""
    lines = read_lines(path)
    _lift_csv_field_limit()
    reader = csv.reader(io.StringIO("\n".join(lines), newline=""))
    header, start = None, 1
    try:
        for fields in reader:
            where, start = f"{path}:{start}", reader.line_num + 1
            if not any(f.strip() for f in fields):
                continue
            if header is None:
                header, header_at = [f.strip() for f in fields], where
            elif len(fields) != len(header):
                raise UserError(f"{where} has {len(fields)} comma-separated fields but the header has {len(header)}; fix the line")
            else:
                yield where, header_at, dict(zip(header, fields))
    except csv.Error as e:
        raise UserError(f"{path}:{reader.line_num}: malformed CSV ({e}); fix the quoting of that line") from None
    if header is None:
        raise UserError(f"{path} is empty; pass a CSV file with a header row and one example per line")


def _lift_csv_field_limit() -> None:
    """A CSV field may be a whole document (a summarisation source), longer than the csv module's
    default limit of 131,072 characters; the file is in memory already, so no limit guards anything."""
    try:
        csv.field_size_limit(sys.maxsize)
    except OverflowError:  # sys.maxsize does not fit the C long of some platforms (64-bit Windows)
        csv.field_size_limit(2**31 - 1)


def _pick(
    row: dict, field: str | None, defaults: Sequence[str], where: str, what: str, option: str, required: bool = True,
    flag: str | None = None,
) -> str | None:
    """The key of `row` that holds `what`: `field` if given, else the first of `defaults` present.
    `option` is the reader's parameter that names the column, `flag` the command line's (default: alike)."""
    candidates = [field] if field else defaults
    key = next((k for k in candidates if k in row), None)
    if key is None and (required or field):
        have = ", ".join(map(str, row)) or "none"
        wanted = " or ".join(repr(k) for k in candidates)
        hint = f"name the column with {flag or '--' + option.replace('_', '-')} NAME (in Python: {option}=NAME)"
        if what in ("label", "target"):
            hint += "; unlabelled data is for `lmforge predict` (in Python: require_labels=False)"
        raise UserError(f"{where}: no {what} column {wanted} (columns: {have}); {hint}")
    return key


def _string(value: Any, where: str, key: str) -> str:
    if not isinstance(value, str):
        raise UserError(f"{where}: {key!r} is {type(value).__name__}, not a string; fix the line")
    text = _nfc(_paired(value, where, key).strip())
    if not text:
        raise UserError(f"{where}: {key!r} is empty; every example needs text")
    return text


def _label(value: Any, where: str, key: str) -> str:
    """Labels are strings; JSON integers (`"label": 1`) are read as their decimal string."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str) or not value.strip():
        raise UserError(f"{where}: {key!r} is {value!r}; a label must be a non-empty string or an integer")
    return _paired(value, where, key).strip()


def _blank(value: Any) -> bool:
    """Whether a label or target that is there holds nothing: an empty cell, JSON null or []."""
    return value is None or value == [] or (isinstance(value, str) and not value.strip())


def _paired(text: str, where: str, key: str) -> str:
    """`text`, refused in one line when it holds a lone surrogate (see _LONE_SURROGATE)."""
    if found := _LONE_SURROGATE.search(text):
        raise UserError(f"{where}: {key!r} holds an unpaired surrogate (\\u{ord(found.group()):04x}); fix the line")
    return text


# --- token tagging ------------------------------------------------------------------------------


def read_tagged(path: str | Path, labels: Sequence[str] | None = None, require_labels: bool = True) -> list[TaggedExample]:
    """Sentences of a CoNLL-style IOB2 file: one token per line, a blank line between sentences.

    The column layout is read from the first token line: `token tag` (WNUT-17), `index token tag ...`
    where the first column numbers the words of every sentence of the file 1, 2, 3, ... (Universal
    NER), otherwise token first and tag last (CoNLL-2003's `token POS chunk tag`). Columns
    are tab-separated when the first token line has a tab, else whitespace-separated. A line starting
    with `#` is a comment only where it cannot be a token line: in a tab-separated file when it holds
    no tab (UNER's `# sent_id = ...`; `#hashtag<TAB>O` is a token), in a whitespace-separated one when
    its fields do not fit the columns (`# text = ...`; `#FollowFriday O` is a token). `-DOCSTART-`
    lines are skipped, whatever their columns (`-DOCSTART- -X- -X- O`, or alone). Tags must be O, B-TYPE or
    I-TYPE; an I-TYPE after O is accepted (conlleval and seqeval read it as the start of an entity).
    `labels`, when given, is the closed tag set. A file with one column holds tokens only: it is read,
    with tags None, only with `require_labels=False` (predicting on unlabelled text).
    """
    path = Path(path)
    allowed = None if labels is None else set(labels)
    lines = read_lines(path)
    out: list[TaggedExample] = []
    tokens: list[str] = []
    tags: list[str] = []
    # The layout comes from the first line that is surely a token line: one not starting with `#`, or
    # holding a tab (comments have none), and no `-DOCSTART-` line (CoNLL-2003 gives it 4 columns
    # whatever the file's).
    nonblank = [i for i, line in enumerate(lines) if line.strip()]
    sure = (i for i in nonblank if (not lines[i].startswith("#") or "\t" in lines[i].strip()) and not _docstart(lines[i]))
    layout_line = next(sure, nonblank[0] if nonblank else -1) + 1
    layout = _tag_layout(lines, layout_line) if layout_line else None  # (tabs, n_columns, token column, tag column)
    start = 0

    for lineno, line in enumerate([*lines, ""], 1):
        if not line.strip() or _docstart(line):  # a blank line, or a document's start, ends a sentence
            if tokens:
                out.append(TaggedExample(tokens, tags or None, f"{path}:{start}"))  # no tags: a tokens-only file
                tokens, tags = [], []
            continue
        assert layout is not None  # the file has a non-blank line
        if line.startswith("#") and _is_comment(line, layout):
            continue
        tabs, n_columns, token_col, tag_col = layout
        fields = _columns(line, tabs)
        where = f"{path}:{lineno}"
        if len(fields) != n_columns:
            raise UserError(
                f"{where} has {len(fields)} columns but line {layout_line} has {n_columns}; "
                "every token line needs the same columns"
            )
        if token_col == 1 and fields[0] != str(len(tokens) + 1):  # an index column: a gap would shift the words
            raise UserError(f"{where}: the index column says {fields[0]!r} for word {len(tokens) + 1} of its sentence; "
                            "number each sentence's words 1, 2, 3, ... (a blank line between sentences)")
        token = fields[token_col]
        if not token:
            raise UserError(f"{where}: the token is empty; fix the line")
        if tag_col is not None:
            tag = fields[tag_col]
            if not _IOB2.fullmatch(tag):
                raise UserError(f"{where}: tag {tag!r} is not IOB2 (O, B-TYPE or I-TYPE); convert the file to IOB2")
            if allowed is not None and tag not in allowed:
                raise UserError(f"{where}: tag {tag!r} is not one of {', '.join(sorted(allowed))}; fix the line or add it to --labels")
            tags.append(tag)
        elif require_labels:
            raise UserError(
                f"{where} holds a token but no tag column; add an IOB2 tag to every token line "
                "(unlabelled text is for `lmforge predict`)"
            )
        if not tokens:
            start = lineno
        tokens.append(_nfc(token))
    return _nonempty(out, path)


def _is_comment(line: str, layout: tuple[bool, int, int, int | None]) -> bool:
    """Whether a line starting with `#` is a comment rather than a token line of the file's layout."""
    tabs, n_columns, _, tag_col = layout
    if tabs:
        return "\t" not in line
    fields = line.split()
    return len(fields) != n_columns or (tag_col is not None and not _IOB2.fullmatch(fields[tag_col]))


def _tag_layout(lines: list[str], layout_line: int) -> tuple[bool, int, int, int | None]:
    """(tabs, n_columns, token column, tag column) from a file's first token line (1-based), and its
    other lines to tell an index column; one column is tokens only."""
    line = lines[layout_line - 1]
    tabs = "\t" in line
    fields = _columns(line, tabs)
    n = len(fields)
    if n == 1:
        return tabs, 1, 0, None
    if n >= 3 and _numbers_words(lines, tabs):
        # index, token, then the tag: last (`1<TAB>Paris<TAB>B-LOC`), or third when annotation columns follow (UNER)
        return tabs, n, 1, n - 1 if _IOB2.fullmatch(fields[-1]) else 2
    return tabs, n, 0, n - 1  # token first, tag last: WNUT's two columns, CoNLL-2003's four


def _numbers_words(lines: list[str], tabs: bool) -> bool:
    """Whether the first column is an index: every token line's first field a number, and the first
    sentence's numbered 1, 2, 3, ... A token column never looks so; where an index breaks off later
    (a gap, a line short of a column), the reader names that line instead of reading the numbers as
    words. Lines starting with `#` are left out: a token line of an indexed file starts with a digit."""
    firsts = [_columns(line, tabs)[0] if line.strip() and not line.startswith("#") and not _docstart(line) else ""
              for line in lines]
    if not all(f.isdigit() for f in firsts if f):
        return False
    sentence = next((run for run in "\n".join(firsts).split("\n\n") if run.strip()), "").split()
    return sentence == [str(i) for i in range(1, len(sentence) + 1)]


def _columns(line: str, tabs: bool) -> list[str]:
    return [f.strip() for f in line.split("\t")] if tabs else line.split()


def _docstart(line: str) -> bool:
    """Whether a line is CoNLL-2003's document separator, `-DOCSTART- -X- -X- O` or just `-DOCSTART-`."""
    return line.split(maxsplit=1)[:1] == ["-DOCSTART-"]


def entities(tags: Sequence[str]) -> list[tuple[str, int, int]]:
    """(type, first, last) of each entity in one sentence's tags, as conlleval.pl chunks them (IOB1,
    IOB2 and IOBES alike; the rules of seqeval's `get_entities`)."""
    chunks = []
    prev_tag, prev_type, begin = "O", "", 0
    for i, label in enumerate([*tags, "O"]):
        tag, type_ = label[:1], label[1:].split("-", 1)[-1] or "_"
        ends = (
            prev_tag in ("E", "S")
            or (prev_tag in ("B", "I") and tag in ("B", "S", "O"))
            or (prev_tag not in ("O", ".") and prev_type != type_)
        )
        starts = (
            tag in ("B", "S")
            or (prev_tag in ("E", "S", "O") and tag in ("E", "I"))
            or (tag not in ("O", ".") and prev_type != type_)
        )
        if ends:
            chunks.append((prev_type, begin, i - 1))
        if starts:
            begin = i
        prev_tag, prev_type = tag, type_
    return chunks


# --- extractive QA ------------------------------------------------------------------------------


def read_squad(path: str | Path, require_labels: bool = True) -> list[QAExample]:
    """Questions of a SQuAD v1.1 JSON file (also XQuAD), in file order.

    Every answer is checked against its context: `context[start : start + len(text)] == text`. Texts
    are kept byte for byte (no NFC), because the offsets count characters of the text as written.
    `require_labels=False` also reads questions without answers (predicting), with answers [].
    """
    path = Path(path)
    with reading(path), open_bytes(path) as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not valid UTF-8 (byte offset {e.start}); convert it to UTF-8") from None
    if not text.strip():
        raise UserError(f"{path} is empty; pass a SQuAD v1.1 JSON file")
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: invalid JSON ({e.msg}, column {e.colno}); fix the file") from None
    hint = 'expected SQuAD v1.1 JSON: {"data": [{"title", "paragraphs": [{"context", "qas": [...]}]}]}'
    articles = doc.get("data") if isinstance(doc, dict) else None
    if not isinstance(articles, list):
        raise UserError(f'{path}: no "data" list; {hint}')
    out, seen = [], set()
    for a, article in enumerate(articles):
        _require_keys(article, ("title", "paragraphs"), f"{path}: article {a}", hint)
        _require_list(article, "paragraphs", f"{path}: article {a}", hint)
        title = _paired(str(article["title"]), f"{path}: article {a}", "title")
        for p, paragraph in enumerate(article["paragraphs"]):
            place = f"{path}: article {a} paragraph {p}"
            _require_keys(paragraph, ("context", "qas"), place, hint)
            _require_list(paragraph, "qas", place, hint)
            context = paragraph["context"]
            if not isinstance(context, str):
                raise UserError(f"{place}: the context is not a string; {hint}")
            _paired(context, place, "context")
            for qa in paragraph["qas"]:
                keys = ("id", "question", "answers") if require_labels else ("id", "question")
                valid_id = isinstance(qa, dict) and "id" in qa and _valid_id(qa["id"])
                at = _question_line(path, text, qa["id"]) if valid_id and any(k not in qa for k in keys) else place
                _require_keys(qa, keys, at, hint)
                if not valid_id:
                    kind = "empty" if isinstance(qa["id"], str) else _json_kind(qa["id"])
                    raise UserError(f"{place}: 'id' is {kind}; each question needs a string id")
                qid = _paired(str(qa["id"]), place, "id")
                where = f"{path}: question {qid}"
                if qid in seen:
                    raise UserError(f"{_question_line(path, text, qa['id'], 1)} appears twice; question ids must be unique")
                seen.add(qid)
                question = qa["question"]
                if not isinstance(question, str) or not question.strip():
                    kind = "empty" if isinstance(question, str) else _json_kind(question)
                    raise UserError(f"{_question_line(path, text, qa['id'])}: 'question' is {kind}; give the question's text")
                if _LONE_SURROGATE.search(question):  # its line is looked up on the error path only
                    _paired(question, _question_line(path, text, qa["id"]), "question")
                if qa.get("answers") is not None and not isinstance(qa["answers"], list):
                    raise UserError(f"{_question_line(path, text, qa['id'])}: 'answers' is {_json_kind(qa['answers'])}, "
                                    'not a list; give [{"text": ..., "answer_start": ...}, ...]')
                answers = qa.get("answers") or []
                if not answers and require_labels:
                    raise UserError(
                        f"{_question_line(path, text, qa['id'])} has no answers; unanswerable (SQuAD v2) questions are not supported"
                    )
                for ans in answers:
                    if problem := _answer_problem(ans, context):
                        raise UserError(f"{_question_line(path, text, qa['id'])}: {problem}")
                answers = [(ans["text"], ans["answer_start"]) for ans in answers]
                out.append(QAExample(qid, title, context, question, answers, where))
    return _nonempty(out, path)


def _require_keys(obj: Any, keys: Sequence[str], where: str, hint: str) -> None:
    missing = [k for k in keys if not isinstance(obj, dict) or k not in obj]
    if missing:
        raise UserError(f"{where}: missing {', '.join(repr(k) for k in missing)}; {hint}")


def _require_list(obj: dict, key: str, where: str, hint: str) -> None:
    if not isinstance(obj[key], list):
        raise UserError(f"{where}: {key!r} is {_json_kind(obj[key])}, not a list; {hint}")


def _valid_id(qid: Any) -> bool:
    """A question id is a non-empty string (SQuAD's) or an integer."""
    return (isinstance(qid, str) and bool(qid.strip())) or (isinstance(qid, int) and not isinstance(qid, bool))


def _json_kind(value: Any) -> str:
    """What a JSON value is, in words: `null`, `a number`, `an object`, ..."""
    if value is None:
        return "null"
    kinds = [(bool, "a boolean"), ((int, float), "a number"), (str, "a string"), (list, "a list"), (dict, "an object")]
    return next((kind for types, kind in kinds if isinstance(value, types)), type(value).__name__)


def _question_line(path: Path, text: str, qid: Any, nth: int = 0) -> str:
    """`FILE:LINE: question ID`, LINE being where the `nth` `"id": ID` of the JSON text is; without
    LINE when it is not found as written (e.g. with escapes). Computed on the error path only."""
    for value in (json.dumps(qid, ensure_ascii=False), json.dumps(qid)):
        hits = list(re.finditer(r'"id"\s*:\s*' + re.escape(value) + "(?![0-9])", text))
        if len(hits) > nth:
            line = text.count("\n", 0, hits[nth].start()) + 1
            return f"{path}:{line}: question {qid}"
    return f"{path}: question {qid}"


def _answer_problem(ans: Any, context: str) -> str | None:
    """What is wrong with one answer of a question, or None."""
    if not isinstance(ans, dict) or not isinstance(ans.get("text"), str) or not isinstance(ans.get("answer_start"), int):
        return f'an answer is {ans!r}; each needs a string "text" and an integer "answer_start"'
    text, start = ans["text"], ans["answer_start"]
    if not text.strip():
        return "an answer's text is empty; give the answer as it is written in the context"
    if start >= 0 and context[start : start + len(text)] == text:
        return None
    found = [i for i in range(len(context)) if context.startswith(text, i)]
    if not found:
        return f"answer text {text!r} does not occur in its context; fix the answer text (or the context)"
    nearest = min(found, key=lambda i: abs(i - start))
    return f"answer text {text!r} is found at offset {nearest} of its context, not at answer_start {start}; fix answer_start"


def split_by_article(
    examples: Sequence[QAExample], fraction: float = 0.8, seed: int = 0
) -> tuple[list[QAExample], list[QAExample]]:
    """Split questions by article (title), so that no paragraph is seen in both halves.

    `fraction` of the articles (rounded, at least one on each side) go to the first half. Articles are
    ranked by a hash of (seed, title), so the split depends only on the set of titles and the seed,
    never on the order of `examples`; each half keeps the input order.
    """
    if not 0.0 < fraction < 1.0:
        raise UserError(f"fraction {fraction} is out of range; pass a value in (0, 1), e.g. 0.8")
    titles = sorted({ex.title for ex in examples})
    if len(titles) < 2:
        raise UserError(f"{len(titles)} article(s) cannot be split by article; pass questions from at least 2 articles")
    ranked = sorted(titles, key=lambda t: hashlib.blake2b(f"{seed}\0{t}".encode(), digest_size=8).digest())
    n_first = min(max(round(fraction * len(titles)), 1), len(titles) - 1)
    first = set(ranked[:n_first])
    return [ex for ex in examples if ex.title in first], [ex for ex in examples if ex.title not in first]


# --- text to text -------------------------------------------------------------------------------


def read_text2text(
    path: str | Path, source_field: str | None = None, target_field: str | None = None, require_labels: bool = True
) -> list[Text2TextExample]:
    """Source/target pairs from JSONL or a CSV with a header; with `require_labels=False` (predicting)
    the target may be missing, and a plain-text file is read as one source per line.

    Fields default to `source`/`src`/`input` and `target`/`tgt`/`output` (on the command line,
    `--text-field` and `--label-field` name them). A list-valued source is a list of sentences and is
    joined with spaces; a list-valued target is a list of references (SciTLDR: `target` is the first,
    `references` all). SciTLDR's own JSONL needs no options. A file is JSONL when its name ends in
    .jsonl or .json (gzip ok) or its first line is a JSON object; otherwise it is plain text. With
    `require_labels=False` an empty or null target is read as none.
    """
    path = Path(path)
    if _inner_suffix(path) == ".csv":
        rows = _csv_rows(path)
    else:
        lines = read_lines(path)
        if any(line.strip() for line in lines) and not _is_jsonl(path, lines):
            return _plain_sources(path, lines, require_labels)
        rows = _jsonl_rows(path, lines)
    out = []
    for where, columns_at, row in rows:
        source_key = _pick(row, source_field, SOURCE_FIELDS, columns_at, "source", "source_field", flag="--text-field")
        target_key = _pick(row, target_field, TARGET_FIELDS, columns_at, "target", "target_field", required=require_labels,
                           flag="--label-field")
        source = " ".join(_strings(row[source_key], where, source_key))
        untargeted = target_key is None or (not require_labels and _blank(row[target_key]))
        references = [] if untargeted else _strings(row[target_key], where, target_key)
        out.append(Text2TextExample(source, references[0] if references else None, references, where))
    return _nonempty(out, path)


def _is_jsonl(path: Path, lines: list[str]) -> bool:
    """Whether a file is JSONL: its name ends in .jsonl or .json (gzip ok), or its first non-blank line
    is a JSON object (JSONL saved as .txt or .ndjson)."""
    first = next((line for line in lines if line.strip()), None)
    return _inner_suffix(path) in (".jsonl", ".json") or (first is not None and _json_object(first))


def _json_object(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except json.JSONDecodeError:
        return False


def _plain_sources(path: Path, lines: list[str], require_labels: bool) -> list[Text2TextExample]:
    """A plain-text file's non-blank lines as sources without targets (predicting)."""
    if require_labels:
        raise UserError(
            f"{path} is plain text, one source per line, without targets; pass the line-aligned target file with "
            "--target (--val-target for a --val file), or give JSONL or CSV with a target field"
        )
    out = [Text2TextExample(line.strip(), None, [], f"{path}:{n}") for n, line in enumerate(lines, 1) if line.strip()]
    return _nonempty(out, path)


def _strings(value: Any, where: str, key: str) -> list[str]:
    """A string, or a list of strings, as a non-empty list of stripped non-empty strings."""
    items = value if isinstance(value, list) else [value]
    if not all(isinstance(v, str) for v in items):
        raise UserError(f"{where}: {key!r} must be a string or a list of strings; fix the line")
    out = [_nfc(_paired(v, where, key).strip()) for v in items if v.strip()]
    if not out:
        raise UserError(f"{where}: {key!r} is empty; every example needs a source and a target")
    return out


def read_parallel_text(src_path: str | Path, tgt_path: str | Path) -> list[Text2TextExample]:
    """Pairs of line-aligned files (gzip ok): line i of one translates line i of the other.

    Different line counts, an empty line in either file, or a file that cannot be read, are errors
    naming the file (and line).
    """
    paths = [Path(src_path), Path(tgt_path)]
    pairs = read_parallel(*paths)
    out = []
    for i, (s, t) in enumerate(pairs, 1):
        if i == 1:
            s, t = s.removeprefix("\ufeff"), t.removeprefix("\ufeff")
        out.append(Text2TextExample(s, t, [t], f"{paths[0]}:{i}"))
    return out


# --- chat ---------------------------------------------------------------------------------------


def read_chat(path: str | Path, require_labels: bool = True) -> list[ChatExample]:
    """Conversations of a JSONL file: `{"messages": [{"role": ..., "content": ...}, ...]}` per line, or
    just the list. Roles are system, user and assistant; each conversation needs an assistant turn,
    since that is what fine-tuning learns from, except with `require_labels=False` (predicting replies)."""
    path = Path(path)
    out = []
    for where, record in _jsonl_records(path):
        messages = record.get("messages") if isinstance(record, dict) else record
        if not isinstance(messages, list) or not messages:
            raise UserError(f'{where}: expected {{"messages": [{{"role": ..., "content": ...}}, ...]}} or a list of messages')
        clean = []
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or message.get("role") not in ROLES or not isinstance(message.get("content"), str):
                got = message.get("role") if isinstance(message, dict) else message
                raise UserError(
                    f"{where}: message {i} ({got!r}) needs a role of {', '.join(ROLES)} and a string content; fix the line"
                )
            clean.append({"role": message["role"], "content": _nfc(_paired(message["content"], where, "content"))})
        if require_labels and not any(m["role"] == "assistant" for m in clean):
            raise UserError(f"{where}: the conversation has no assistant message; add the reply to learn from")
        out.append(ChatExample(clean, where))
    return _nonempty(out, path)


# --- shared reading -----------------------------------------------------------------------------


def _jsonl_records(path: Path, lines: list[str] | None = None) -> Iterator[tuple[str, Any]]:
    for lineno, line in enumerate(read_lines(path) if lines is None else lines, 1):
        if not line.strip():
            continue
        try:
            yield f"{path}:{lineno}", json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{lineno}: invalid JSON ({e.msg}, column {e.colno}); each line must be one JSON value") from None


def _jsonl_rows(path: Path, lines: list[str] | None = None) -> Rows:
    for where, record in _jsonl_records(path, lines):
        if not isinstance(record, dict):
            raise UserError(f"{where}: expected a JSON object, got {type(record).__name__}; fix the line")
        yield where, where, record


def _inner_suffix(path: Path) -> str:
    """The suffix that says the format, looking inside `.gz`: `a.jsonl.gz` -> `.jsonl`."""
    name = path.name.lower().removesuffix(".gz")
    return Path(name).suffix


def _nonempty(examples: list, path: Path) -> list:
    if not examples:
        raise UserError(f"{path} has no examples; pass a file with at least one")
    return examples


def _nfc(text: str) -> str:
    """NFC, as the corpus reader does, so fine-tuning text tokenizes like pretraining text."""
    return unicodedata.normalize("NFC", text)
