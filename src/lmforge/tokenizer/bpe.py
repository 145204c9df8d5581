"""A byte-level BPE tokenizer over HF `tokenizers`, the GPT-2 recipe.

Byte level means every string is representable: text is turned into UTF-8 bytes before BPE, so
there is no unknown token and `decode(encode(text)) == text` for any Unicode (emoji ZWJ sequences,
combining marks, `\\r\\n` included). There is deliberately no normalizer: normalisation (NFC) is a
property of the corpus and happens in `lmforge.data`, so the tokenizer never changes text.

The five special tokens take ids 0..4 in every tokenizer lmforge trains. A tokenizer imported
from elsewhere keeps its own ids: each role is the token its tokenizer_config.json declares, else
found by name (lmforge's, then BERT's [PAD]/[MASK]/[CLS]/[SEP]); only end-of-text is required, and
a vocabulary without one (BERT's) ends a text with its separator [SEP]. The others may be None.
`encode` never adds any of them by itself; a literal special token in the text (`<|endoftext|>`) is
matched as that token (the HF default), and `decode` writes special tokens back out. A corpus is read
otherwise (`encode_batch(..., eot_only=True)`, as `lmforge prepare` reads one): only a literal
end-of-text is the token, a document boundary as in TinyStories' text, and every other special
token's text is plain text, as tiktoken's `encode(text, allowed_special={"<|endoftext|>"})`; a chat
message's text never becomes a special token (`encode_chat`).
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import threading
import traceback
from datetime import datetime
from functools import cache, cached_property
from pathlib import Path
from typing import Callable, Iterable, Iterator

import tokenizers
from jinja2 import TemplateError, nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import decoders, models, pre_tokenizers, trainers

from lmforge.utils.errors import UserError, first_line
from lmforge.utils.fs import atomic_write_text, read_json_object

SPECIAL_TOKENS = ("<|endoftext|>", "<|pad|>", "<|mask|>", "<|cls|>", "<|sep|>")
# End-of-text by the names lmforge/GPT-2, Llama 3, Llama 2 and ChatML tokenizers give it.
EOT_NAMES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<|im_end|>")
# The other roles by lmforge's names, then BERT's, where tokenizer_config.json declares none.
ROLE_NAMES = {"pad": ("<|pad|>", "[PAD]"), "mask": ("<|mask|>", "[MASK]"), "cls": ("<|cls|>", "[CLS]"), "sep": ("<|sep|>", "[SEP]")}
ROLES = ("eos", "bos", *ROLE_NAMES)  # tokenizer_config.json's keys are these + "_token"
_ALPHABET = pre_tokenizers.ByteLevel.alphabet()
MIN_VOCAB_SIZE = len(_ALPHABET) + len(SPECIAL_TOKENS)
# 2**24 (16.7M) is 64x the largest vocabularies in use (Gemma's 262,144) and still fits uint32 shards;
# HF's BpeTrainer reserves room for the whole vocabulary up front, so a typo such as 1e11 would
# abort the process with an out-of-memory error instead of a message.
MAX_VOCAB_SIZE = 1 << 24
# A literal special token in training text is split out: `encode` matches it as the special token,
# so merges for its pieces (`<|`, `|>`, `endoftext`) or across it would never be used.
_SPECIALS = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS))
CONFIG_FILE = "tokenizer_config.json"
TEMPLATE_FILE = "chat_template.jinja"  # where transformers >= 4.43 saves the chat template
# Where Hugging Face keeps the ids that end a generated text (`eos_token_id`, an id or a list: Llama 3's
# end of text, end of turn and end of message); `load` reads them beside tokenizer.json.
GENERATION_FILE = "generation_config.json"
_TRAIN_HINT = "train one with `lmforge tokenizer train FILES... --vocab-size N --out DIR`"


def _byte_level_chars() -> dict[str, int]:
    """GPT-2's bytes_to_unicode, inverted: the character a byte-level vocabulary writes for each byte."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {chr(b): b for b in bs}
    for n, b in enumerate(b for b in range(256) if b not in bs):
        chars[chr(256 + n)] = b
    return chars


_BYTE_OF = _byte_level_chars()
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece's byte tokens


# BPE training takes time that grows faster than linearly with a word's length: one unbroken line of
# 200,000 random letters took 8.3 s to train a 2,048-token vocabulary on (0.3 s in pieces). Runs of
# non-space characters longer than this (minified code, base64) train in pieces of this length;
# encoding is unchanged.
LONG_RUN = 256
_LONG = re.compile(r" ?\S{%d,}" % (LONG_RUN + 1))  # with the space before it, which the pre-tokenizer keeps on the word


def _training_pieces(texts: Iterable[str]) -> Iterator[str]:
    """`texts` as the trainer sees them: the literal special tokens cut out (each piece around one
    trains on its own, as it is encoded), and runs of more than LONG_RUN non-space characters cut
    into pieces of LONG_RUN (the first with the space before the run)."""
    for text in texts:
        for piece in (_SPECIALS.split(text) if "<|" in text else (text,)):
            if len(piece) <= LONG_RUN or not _LONG.search(piece):
                if piece:
                    yield piece
                continue
            at = 0
            for run in _LONG.finditer(piece):
                if run.start() > at:
                    yield piece[at: run.start()]
                yield from (piece[i: min(i + LONG_RUN, run.end())] for i in range(run.start(), run.end(), LONG_RUN))
                at = run.end()
            if at < len(piece):
                yield piece[at:]


class _Abandoned(Exception):
    """Raised into HF's reading of the texts once the caller has been interrupted."""


def _in_daemon_thread(work: Callable[[], None]) -> None:
    """Run `work` in a daemon thread and wait for it in short waits.

    HF's merge loop runs in Rust for as long as it takes (a minute on a large corpus), and Python
    raises KeyboardInterrupt only when the main thread runs Python again: Ctrl-C would wait for the
    merges. Waiting on an event, the main thread takes the interrupt at once; the abandoned thread ends
    with the process.
    """
    failure: list[BaseException] = []
    done = threading.Event()  # waited on rather than joined: a join that Ctrl-C interrupts marks the thread stopped

    def run() -> None:
        try:
            work()
        except BaseException as e:  # handed to the caller's thread below
            failure.append(e)
        finally:
            done.set()

    threading.Thread(target=run, name="lmforge-bpe-train", daemon=True).start()
    while not done.wait(0.1):
        pass
    if failure:
        raise failure[0]


def _token_name(roles: dict, key: str, file: Path) -> str | None:
    """A role's token from a tokenizer_config.json: a string, or Hugging Face's AddedToken object
    (`{"__type": "AddedToken", "content": "</s>", ...}`), whose text is its "content"."""
    value = roles.get(key)
    if isinstance(value, dict):
        value = value.get("content")
        if not isinstance(value, str):
            raise UserError(f'{file}: {key} is an object without a string "content"; fix the file or delete it')
    elif value is not None and not isinstance(value, str):
        raise UserError(f"{file}: {key} is {value!r}, not a token string; fix the file or delete it")
    return value


def _end_ids(file: Path) -> list[int]:
    """The end-of-text ids of a generation_config.json (`eos_token_id`: an id, a list of ids, or null), if
    there is one; read as JSON data, never run."""
    if not file.is_file():
        return []
    fix = "fix it, or delete it (its other generation settings are not used)"
    config = read_json_object(file, "generation settings", fix)
    value = config.get("eos_token_id")
    ids = [] if value is None else [value] if isinstance(value, int) else value
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise UserError(f"{file}: eos_token_id {value!r} is not an id or a list of ids; {fix}")
    return ids


def _chat_template(value: object, file: Path) -> str | None:
    """The chat template of a tokenizer_config.json: a string, or from Hugging Face's list of named
    templates ([{"name": "default", "template": ...}, {"name": "tool_use", ...}]) the default one."""
    if value is None or isinstance(value, str):
        return value
    fix = "fix the file or delete the key"
    if not isinstance(value, list):
        raise UserError(f"{file}: chat_template is a {type(value).__name__}, not a string or a list of named templates; {fix}")
    named = {}
    for item in value:
        if not (isinstance(item, dict) and isinstance(item.get("name"), str) and isinstance(item.get("template"), str)):
            raise UserError(f'{file}: chat_template holds {item!r}, not {{"name": ..., "template": ...}}; {fix}')
        named[item["name"]] = item["template"]
    if "default" not in named:
        raise UserError(f"{file}: chat_template has no template named 'default' (only {sorted(named)}); {fix}")
    return named["default"]


def _space_mark(decoder: dict | None) -> str | None:
    """The character a SentencePiece-style decoder writes a space as ('▁'): a Metaspace decoder's, or a
    Replace decoder's that turns it into " " (Llama 2's tokenizer.json); None for any other decoder."""
    if not decoder:
        return None
    if decoder.get("type") == "Metaspace":
        return decoder.get("replacement")
    if decoder.get("type") == "Replace" and decoder.get("content") == " ":
        return (decoder.get("pattern") or {}).get("String")
    return next((m for d in decoder.get("decoders") or () if (m := _space_mark(d))), None)


class _Generation(Extension):
    """`{% generation %}...{% endgeneration %}`, which transformers' templates may use to mark the
    assistant's text (for its assistant-token mask): the text inside is rendered as it stands."""

    tags = {"generation"}

    def parse(self, parser) -> list[nodes.Node]:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


def _tojson(x: object, ensure_ascii: bool = False, indent: int | None = None, separators: tuple[str, str] | None = None,
            sort_keys: bool = False) -> str:
    """transformers' `tojson`: Jinja's own escapes <, >, & and ' as HTML and sorts the keys, which
    changes the tool schemas and arguments a template writes into the prompt."""
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


@cache
def _chat_environment() -> ImmutableSandboxedEnvironment:
    """The Jinja environment of transformers' `apply_chat_template`, so that a template renders the text
    the model was trained on: {% break %}/{% continue %} (Qwen's templates), its `tojson`, the
    `strftime_now` of Llama 3's templates, `raise_exception`. The sandbox is immutable: the template
    is a file's code."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols, _Generation])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)
    return env


class ChatTemplateError(UserError):
    """A chat template that failed on a conversation; `reason` is what it raised, in one line."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"the chat template failed on this conversation ({reason}); fix the chat template")
        self.reason = reason


class Tokenizer:
    """An HF `tokenizers` tokenizer with named special-token roles; the wrapped one is `self.hf`."""

    def __init__(
        self,
        hf: tokenizers.Tokenizer,
        origin: str = "tokenizer",
        eos_token: str | None = None,
        bos_token: str | None = None,
        chat_template: str | None = None,
        pad_token: str | None = None,
        mask_token: str | None = None,
        cls_token: str | None = None,
        sep_token: str | None = None,
        end_ids: Iterable[int] = (),
    ):
        # Tokenizers trained here hold SPECIAL_TOKENS at ids 0..4. Imported ones (GPT-2, Llama,
        # SmolLM2, BERT) keep their own ids: a role is the token declared for it, or found by name.
        def find(*names: str | None) -> int | None:
            return next((i for name in names if name and (i := hf.token_to_id(name)) is not None), None)

        self.pad_id, self.mask_id, self.cls_id, self.sep_id = (
            find(declared, *ROLE_NAMES[role]) for role, declared in
            (("pad", pad_token), ("mask", mask_token), ("cls", cls_token), ("sep", sep_token)))
        if eos_token:
            self.eot_id = find(eos_token)
            if self.eot_id is None:
                raise UserError(f"{origin} has no end-of-text token: the declared eos_token {eos_token!r} is not in its "
                                "vocabulary; fix eos_token in tokenizer_config.json")
        else:  # an encoder's vocabulary (BERT's) has none: its texts end in the separator
            eot = find(*EOT_NAMES)
            self.eot_id = eot if eot is not None else self.sep_id
            if self.eot_id is None:
                raise UserError(f"{origin} has no end-of-text token (looked for {[*EOT_NAMES, *ROLE_NAMES['sep']]}); "
                                f"name it as eos_token in tokenizer_config.json, or {_TRAIN_HINT}")
        self.bos_id = find(bos_token)
        # The vocabulary's unknown token (BERT's [UNK], SentencePiece's <unk>) is its model's, in tokenizer.json;
        # byte-level BPE has none. transformers reads it from tokenizer_config.json, so `roles` carries it there.
        self.unk_id = find(getattr(hf.model, "unk_token", None))
        # A Jinja template that turns a list of {"role", "content"} messages into a prompt (HF's convention).
        self.chat_template = chat_template
        self.hf = hf
        self.vocab_size = hf.get_vocab_size(with_added_tokens=True)
        # Every id that ends a generated text, the end-of-text token first: more where the model's generation
        # config names more (Llama 3 Instruct ends a turn at <|eot_id|>, a text at <|end_of_text|>). An id past
        # the vocabulary names no token of it (transformers saves GPT-2's 50256 for any tokenizer): left out.
        self.end_ids = tuple(dict.fromkeys(i for i in (self.eot_id, *end_ids) if 0 <= i < self.vocab_size))
        # Hash of the canonical serialisation: data shards and checkpoints record it, so a
        # mismatch between the tokenizer a model was trained with and the one used later shows.
        self.sha256 = hashlib.sha256(self.to_str().encode("utf-8")).hexdigest()

    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        vocab_size: int,
        min_frequency: int = 2,
        show_progress: bool = True,
    ) -> Tokenizer:
        """Learn merges from `texts` until the vocabulary (specials and 256 bytes included) is full.

        On a small corpus there may be fewer than `vocab_size` merges worth making; `vocab_size`
        of the result is then smaller than asked.
        """
        if vocab_size < MIN_VOCAB_SIZE:
            raise UserError(
                f"vocab_size {vocab_size} is too small: a byte-level tokenizer needs at least "
                f"{MIN_VOCAB_SIZE} (256 bytes + {len(SPECIAL_TOKENS)} special tokens); "
                f"pass --vocab-size {MIN_VOCAB_SIZE} or more"
            )
        if vocab_size > MAX_VOCAB_SIZE:
            raise UserError(
                f"vocab_size {vocab_size} is too large: lmforge caps it at {MAX_VOCAB_SIZE:,} (2**24, 64x the largest "
                "vocabularies in use); pass a smaller --vocab-size such as 32000"
            )
        if min_frequency < 0:
            raise UserError(f"min_frequency must be >= 0, got {min_frequency}; pass e.g. --min-frequency 2")
        hf = tokenizers.Tokenizer(models.BPE())
        # add_prefix_space=False keeps the round trip exact: no space is invented before the text.
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=_ALPHABET,  # every byte gets a token even if the corpus lacks it
            # HF draws its bar on a terminal; elsewhere it would only print blank lines.
            show_progress=show_progress and sys.stderr.isatty(),
        )
        abandoned = threading.Event()

        def pieces() -> Iterator[str]:
            for piece in _training_pieces(texts):
                if abandoned.is_set():
                    raise _Abandoned  # stops HF's reading; its merges cannot be stopped
                yield piece

        try:
            _in_daemon_thread(lambda: hf.train_from_iterator(pieces(), trainer))
        except KeyboardInterrupt:
            abandoned.set()
            raise
        return cls(hf)

    @classmethod
    def from_str(cls, s: str, origin: str = "tokenizer JSON", fix: str = _TRAIN_HINT, **roles: str | None) -> Tokenizer:
        """The tokenizer of a tokenizer.json's text; `roles` as `__init__` takes them; `fix` ends the
        error of a text that does not parse."""
        try:
            hf = tokenizers.Tokenizer.from_str(s)
        except Exception as e:  # HF raises a bare Exception for every parse error
            raise UserError(f"{origin} is corrupt ({first_line(e)}); {fix}") from None
        return cls(hf, origin, **roles)

    @classmethod
    def load(cls, path: str | Path, fix: str = _TRAIN_HINT) -> Tokenizer:
        """Load `path/tokenizer.json`, or `path` itself when it names the file, with the roles and chat
        template of tokenizer_config.json beside it; a chat_template.jinja there takes precedence over
        the config's template, as in transformers. `fix` ends the error of a missing or damaged
        tokenizer.json: training a new one is right for a tokenizer directory, never for one that
        weights or shards were made with (their loaders say how to get that one back)."""
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            where = path if path.is_dir() or path.name != "tokenizer.json" else path.parent
            raise UserError(f"no tokenizer.json in {where}; {fix}")
        try:
            text = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read {file} ({first_line(e)}); {fix}") from None
        extra, template = file.parent / CONFIG_FILE, file.parent / TEMPLATE_FILE
        config = read_json_object(extra, "tokenizer settings", "delete it or re-save the tokenizer") if extra.is_file() else {}
        roles = {f"{role}_token": _token_name(config, f"{role}_token", extra) for role in ROLES}
        roles["chat_template"] = _chat_template(config.get("chat_template"), extra)
        if template.is_file():
            try:
                roles["chat_template"] = template.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise UserError(f"cannot read {template} ({e}); fix or delete it") from None
        return cls.from_str(text, origin=str(file), fix=fix, end_ids=_end_ids(file.parent / GENERATION_FILE), **roles)

    def roles(self) -> dict[str, str]:
        """The special tokens by role and the chat template, in tokenizer_config.json's key names."""
        ids = {"eos": self.eot_id, "bos": self.bos_id, "pad": self.pad_id, "mask": self.mask_id, "cls": self.cls_id,
               "sep": self.sep_id, "unk": self.unk_id}
        out = {f"{role}_token": self.hf.id_to_token(i) for role, i in ids.items() if i is not None}
        return {**out, "chat_template": self.chat_template} if self.chat_template else out

    def save(self, directory: str | Path) -> Path:
        """Write `directory/tokenizer.json` (and `tokenizer_config.json` with the roles and chat
        template, in Hugging Face's key names); return the tokenizer.json path. Each file is written
        atomically, the pair is not: an output that must arrive whole saves into `atomic_dir`'s
        temporary directory (as `train_tokenizer` and checkpoints do).

        A chat_template.jinja already there is removed: `load` reads it before the config's template,
        so it would give this tokenizer the template of the one saved there before.
        """
        if not str(directory).strip():  # an unset variable: not the current directory by accident
            raise UserError("the output directory is empty; pass the directory to write the tokenizer to, e.g. --out tok")
        path = Path(directory) / "tokenizer.json"
        atomic_write_text(path, self.hf.to_str(pretty=True))
        atomic_write_text(path.parent / CONFIG_FILE, json.dumps(self.roles(), indent=2) + "\n")
        if len(self.end_ids) > 1:  # `load` reads them back from there; other settings already in the file stay
            generation = path.parent / GENERATION_FILE
            try:
                kept = json.loads(generation.read_text(encoding="utf-8")) if generation.is_file() else {}
            except (OSError, UnicodeDecodeError, json.JSONDecodeError):
                kept = {}  # a damaged one: replaced by the ids
            kept = kept if isinstance(kept, dict) else {}
            atomic_write_text(generation, json.dumps({**kept, "eos_token_id": list(self.end_ids)}, indent=2) + "\n")
        try:
            (path.parent / TEMPLATE_FILE).unlink(missing_ok=True)
        except OSError as e:
            raise UserError(f"cannot remove the earlier {path.parent / TEMPLATE_FILE} ({e.strerror}), which would "
                            "override this tokenizer's chat template; delete it") from None
        return path

    def to_str(self) -> str:
        """The canonical (compact) JSON that `sha256` is computed from."""
        return self.hf.to_str()

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    @cached_property
    def prompt_prefix(self) -> tuple[int, ...]:
        """The ids the tokenizer's own post-processor puts before a single text (Llama's BOS, from
        its tokenizer.json or a GGUF's add_bos_token), which transformers and vLLM give a prompt;
        none for lmforge's tokenizers, GPT-2's and SmolLM2's."""
        plain, framed = self.encode("a"), self.hf.encode("a", add_special_tokens=True).ids
        start = next((i for i in range(len(framed) - len(plain) + 1) if framed[i : i + len(plain)] == plain), 0)
        return tuple(framed[:start])

    def encode_prompt(self, text: str) -> list[int]:
        """A prompt to continue: `encode`'s ids after `prompt_prefix`, unless the text spells it already."""
        ids, prefix = self.encode(text), list(self.prompt_prefix)
        return ids if ids[: len(prefix)] == prefix else prefix + ids

    def encode_batch(self, texts: list[str], eot_only: bool = False) -> list[list[int]]:
        """Encode many texts at once on all cores (HF runs the batch on Rust threads).

        `eot_only` reads the texts as a pretraining corpus: a literal end-of-text is that token (the
        separator of documents in TinyStories' .txt), every other special token's text is plain text,
        so that a corpus spelling "<|mask|>" or "<|pad|>" gets no control token (tiktoken's
        `allowed_special={"<|endoftext|>"}`).
        """
        hf = self._eot_only if eot_only else self.hf
        return [e.ids for e in hf.encode_batch(texts, add_special_tokens=False)]

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids and each token's (start, end) character span in `text` (for aligning labels)."""
        enc = self.hf.encode(text, add_special_tokens=False)
        return enc.ids, enc.offsets

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The text of a conversation ([{"role", "content"}]) under this tokenizer's Jinja chat template.

        Rendered in Jinja's immutable sandbox: the template comes from a file, and loading never
        runs code from a file. Raises UserError when there is no template or it fails.
        """
        if not self.chat_template:
            raise UserError("the tokenizer has no chat template; use an instruction-tuned checkpoint (e.g. an imported SmolLM2-Instruct)")
        eos = self.hf.id_to_token(self.eot_id)
        bos = self.hf.id_to_token(self.bos_id) if self.bos_id is not None else ""
        try:
            return _chat_environment().from_string(self.chat_template).render(
                messages=messages, add_generation_prompt=add_generation_prompt, eos_token=eos, bos_token=bos)
        except Exception as e:
            # The template is a file's code: what it raises (a syntax error, raise_exception, 1/0, a
            # filter on a message it cannot take, deep recursion) is its failure. An error that never
            # passed through the template's code is a bug here, and keeps its traceback.
            if not isinstance(e, TemplateError) and not any(
                    frame.f_code.co_filename == "<template>" for frame, _ in traceback.walk_tb(e.__traceback__)):
                raise
            raise ChatTemplateError(f"{type(e).__name__}: {first_line(e)}") from None

    def encode_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
        """The ids of a conversation under the chat template, the messages' own text read as text.

        Encoding the rendered text would turn a message that spells a special token ("hi<|im_end|>
        <|im_start|>system ...") into that token: a user could end their turn and open another
        role's. Here a special token inside a message's text becomes the pieces of its text, while
        the template's own stay special; every other token keeps the id the whole rendered text
        gives it, so a conversation that spells no special token gets exactly those ids. Where the
        messages sit in the text is found by rendering the template once more with a marker in place
        of each message. A template that does not put the messages in as given (or trimmed) cannot
        tell a spelled token from its own: a message that spells one is then refused.
        """
        return self.encode_chat_with_offsets(messages, add_generation_prompt)[1]

    def encode_chat_with_offsets(self, messages: list[dict[str, str]], add_generation_prompt: bool = True
                                 ) -> tuple[str, list[int], list[tuple[int, int]]]:
        """`encode_chat`, with the rendered text and each token's (start, end) in it."""
        text = self.apply_chat_template(messages, add_generation_prompt)
        enc = self.hf.encode(text, add_special_tokens=False)
        added = self.hf.get_added_tokens_decoder()
        spelled = [t.content for t in added.values()
                   if any(isinstance(m.get("content"), str) and t.content in m["content"] for m in messages)]
        if not spelled:  # the usual case: the template is rendered once
            return text, enc.ids, enc.offsets
        spans = self.message_spans(messages, add_generation_prompt, text)
        if not spans:  # fail closed: a message's special-token text cannot be told from the template's
            raise UserError(f"a message spells the special token {spelled[0]!r}, and this chat template changes the "
                            "messages, so it cannot be kept as text; remove it from the message")
        ids: list[int] = []
        offsets: list[tuple[int, int]] = []
        for i, (a, b) in zip(enc.ids, enc.offsets):
            if i in added and any(s <= a and b <= e for s, e in spans):
                pieces = self._literal.encode(text[a:b], add_special_tokens=False)
                ids += pieces.ids
                offsets += [(a + c, a + d) for c, d in pieces.offsets]
            else:
                ids.append(i)
                offsets.append((a, b))
        return text, ids, offsets

    @cached_property
    def _literal(self) -> tokenizers.Tokenizer:
        """A copy of the tokenizer that reads special tokens' text as text."""
        return self._specials_as_text()

    @cached_property
    def _eot_only(self) -> tokenizers.Tokenizer:
        """A copy of the tokenizer that reads special tokens' text as text, all but end-of-text's."""
        return self._specials_as_text(but=self.eot_id)

    def _specials_as_text(self, but: int | None = None) -> tokenizers.Tokenizer:
        """A copy of the tokenizer that reads the text of every special token but token `but` as text
        (built whole before it is cached). HF's switch for it passes over added tokens not marked
        special, so `but` is marked not special: matched as before, on the same text."""
        spec = json.loads(self.hf.to_str())
        for token in spec.get("added_tokens") or ():
            if token["id"] == but:
                token["special"] = False
        literal = tokenizers.Tokenizer.from_str(json.dumps(spec))
        literal.encode_special_tokens = True
        return literal

    def message_spans(self, messages: list[dict[str, str]], add_generation_prompt: bool, text: str) -> list[tuple[int, int]]:
        """The (start, end) of each message's text in `text` (the rendered conversation), in order;
        [] when the template does not insert the messages verbatim (or trimmed)."""
        marks = [f"\ue000{i}\ue001" for i in range(len(messages))]
        marked = [{**m, "content": mark} if isinstance(m.get("content"), str) else m for m, mark in zip(messages, marks)]
        try:
            skeleton = self.apply_chat_template(marked, add_generation_prompt)
        except UserError:
            return []
        parts = re.split("(\ue000\\d+\ue001)", skeleton)
        for clean in (lambda c: c, str.strip):
            spans, pieces, at = [], [], 0
            for part in parts:
                if part in marks:
                    content = clean(messages[marks.index(part)]["content"])
                    spans.append((at, at + len(content)))
                    part = content
                pieces.append(part)
                at += len(part)
            if "".join(pieces) == text:
                return spans
        return []

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """The text of `ids`; special tokens as their text unless `skip_special_tokens` (vLLM's default for replies)."""
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes token `token_id` stands for. A byte-level token may hold part of a
        multi-byte character, which `decode([token_id])` writes as U+FFFD; here it is exact, so the
        tokens of a text give back its UTF-8 bytes (special tokens: their text; an id past the
        vocabulary, as a model padded beyond it may sample: none, as `decode` skips it).

        A SentencePiece-style piece ('▁world', Llama 2) is its text with '▁' as a space, and a byte
        token (<0xF0>) its byte: decoded alone, the decoder would strip the space that starts a text.
        So the tokens of a text give back its bytes after the space such a tokenizer's normalizer
        puts in front of a text (" Hello" for "Hello")."""
        return self._bytes[token_id] if 0 <= token_id < len(self._bytes) else b""

    @cached_property
    def _bytes(self) -> list[bytes]:
        added = {i: t.content for i, t in self.hf.get_added_tokens_decoder().items()}
        byte_level = isinstance(self.hf.decoder, decoders.ByteLevel)
        space = None if byte_level else _space_mark(json.loads(self.to_str()).get("decoder"))
        table = []
        for i in range(self.vocab_size):
            piece = self.hf.id_to_token(i) or ""
            if i in added:
                table.append(added[i].encode("utf-8"))
            elif byte_level and all(c in _BYTE_OF for c in piece):
                table.append(bytes(_BYTE_OF[c] for c in piece))
            elif m := _BYTE_FALLBACK.fullmatch(piece):
                table.append(bytes([int(m.group(1), 16)]))
            elif space:
                table.append(piece.replace(space, " ").encode("utf-8"))
            else:  # another vocabulary (WordPiece): the decoder's text
                table.append(self.decode([i]).encode("utf-8"))
        return table

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, sha256={self.sha256[:12]})"
