"""Byte-level BPE: exact round trips on any Unicode, fixed special ids, save/load identity."""

import _thread
import hashlib
import json
import random
import signal
import threading

import pytest
import tokenizers

from lmforge.tokenizer import SPECIAL_TOKENS, Tokenizer
from lmforge.utils.errors import UserError

CORPUS = [
    "The quick brown fox jumps over the lazy dog.\n" * 20,
    "Der schnelle braune Fuchs springt über den faulen Hund. Größe, Straße, Äpfel.\n" * 10,
    "敏捷的棕色狐狸跳过了懒狗。我们今天去公园散步吧！\n" * 10,
    "Быстрая коричневая лиса прыгает через ленивую собаку.\n" * 10,
    "def f(x):\n\treturn x + 1  # comment\r\n" * 10,
    "emoji 😀🎉👍🏽 and more 🚀🔥\n" * 10,
]

SAMPLES = [
    "",
    "hello world",
    "  two leading spaces and trailing  ",
    "\ttab\tseparated\tvalues\n",
    "windows\r\nline\r\nendings\r\n",
    "中文字符和标点：你好，世界！",
    "日本語のテキスト、한국어 텍스트, ภาษาไทย, हिन्दी, العربية, עברית",
    "family 👨\u200d👩\u200d👧\u200d👦, flag 🏳️\u200d🌈, skin 👋🏿, keycap 1️⃣",
    "combining: e\u0301 a\u0308 n\u0303 (not normalised on purpose)",
    "control \x00\x01\x7f and specials <|endoftext|><|pad|> inside text",
    "math ∑∫√∞ ≠ ≤, arrows ←→, box ┌─┐, private use \ue000, astral 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "\n\n\n   \n",
]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(CORPUS, vocab_size=400, show_progress=False)


def test_special_tokens_have_ids_0_to_4(tok):
    assert SPECIAL_TOKENS == ("<|endoftext|>", "<|pad|>", "<|mask|>", "<|cls|>", "<|sep|>")
    assert [tok.eot_id, tok.pad_id, tok.mask_id, tok.cls_id, tok.sep_id] == [0, 1, 2, 3, 4]
    assert [tok.hf.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    assert tok.encode("<|endoftext|>") == [0]


def test_vocab_size_is_what_was_asked(tok):
    assert tok.vocab_size == 400 == tok.hf.get_vocab_size(with_added_tokens=True)


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip_is_exact(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert all(0 <= i < tok.vocab_size for i in ids)


def test_every_token_is_bytes_of_the_text(tok):
    """Byte level means the tokens partition the UTF-8 bytes: no unknown token, no lost byte."""
    text = "".join(SAMPLES[1:9])
    ids = tok.encode(text)
    vocab = {i: t for t, i in tok.hf.get_vocab().items()}
    byte_of = {c: b for b, c in enumerate(_gpt2_byte_chars())}
    token_bytes = b"".join(bytes(byte_of[c] for c in vocab[i]) for i in ids)
    assert token_bytes == text.encode("utf-8")


def _gpt2_byte_chars() -> list[str]:
    """GPT-2's bytes_to_unicode table, written out independently of HF."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs))]


def test_merges_compress_frequent_text(tok):
    text = "The quick brown fox jumps over the lazy dog."
    assert len(tok.encode(text)) < len(text.encode("utf-8")) / 2


def test_encode_adds_no_special_tokens(tok):
    assert tok.encode("") == []
    ids = tok.encode("hello")
    assert not set(ids) & {0, 1, 2, 3, 4}


def test_encode_batch_equals_encode(tok):
    assert tok.encode_batch(SAMPLES) == [tok.encode(t) for t in SAMPLES]


def test_decode_keeps_special_tokens(tok):
    assert tok.decode(tok.encode("a") + [tok.eot_id] + tok.encode("b")) == "a<|endoftext|>b"


def test_too_small_vocab_names_the_minimum():
    with pytest.raises(UserError, match="at least 261"):
        Tokenizer.train(CORPUS, vocab_size=260, show_progress=False)


def test_smallest_vocab_is_bytes_and_specials_only():
    tok = Tokenizer.train(CORPUS, vocab_size=261, show_progress=False)
    assert tok.vocab_size == 261
    assert tok.decode(tok.encode(SAMPLES[7])) == SAMPLES[7]


def test_save_load_is_identity(tok, tmp_path):
    path = tok.save(tmp_path / "t")
    assert path == tmp_path / "t" / "tokenizer.json"
    for where in (tmp_path / "t", path, str(path)):
        loaded = Tokenizer.load(where)
        assert loaded.sha256 == tok.sha256
        assert loaded.encode_batch(SAMPLES) == tok.encode_batch(SAMPLES)
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == ["tokenizer.json", "tokenizer_config.json"]  # no temp file left


def test_sha256_is_of_the_canonical_json(tok):
    assert tok.sha256 == hashlib.sha256(tok.to_str().encode("utf-8")).hexdigest()
    assert Tokenizer.from_str(tok.to_str()).sha256 == tok.sha256
    other = Tokenizer.train(CORPUS, vocab_size=300, show_progress=False)
    assert other.sha256 != tok.sha256


def test_load_missing_says_how_to_train(tmp_path):
    with pytest.raises(UserError, match=r"no tokenizer.json in .*lmforge tokenizer train"):
        Tokenizer.load(tmp_path)
    with pytest.raises(UserError, match="no tokenizer.json in"):
        Tokenizer.load(tmp_path / "nope")


def test_load_corrupt_is_a_user_error(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    with pytest.raises(UserError, match="corrupt"):
        Tokenizer.load(tmp_path)
    (tmp_path / "tokenizer.json").write_bytes(b"\xff\xfe garbage")
    with pytest.raises(UserError, match="cannot read"):
        Tokenizer.load(tmp_path)


def test_foreign_tokenizer_without_end_of_text_is_refused(tmp_path):
    hf = tokenizers.Tokenizer(tokenizers.models.BPE())
    (tmp_path / "tokenizer.json").write_text(hf.to_str())
    with pytest.raises(UserError, match="no end-of-text token"):
        Tokenizer.load(tmp_path)


def test_foreign_tokenizer_keeps_its_own_ids(tmp_path):
    """A GPT-2-style tokenizer: only <|endoftext|>, at the end of the vocabulary."""
    hf = tokenizers.Tokenizer(tokenizers.models.BPE())
    hf.add_tokens(["a", "b", "c"])
    hf.add_special_tokens(["<|endoftext|>"])
    (tmp_path / "tokenizer.json").write_text(hf.to_str())
    tok = Tokenizer.load(tmp_path)
    assert tok.eot_id == 3 and tok.pad_id is None and tok.mask_id is None


def test_roles_and_chat_template_survive_save_and_load(tok, tmp_path):
    template = "{% for m in messages %}<|sep|>{{ m['content'] }}{% endfor %}"
    custom = Tokenizer(tok.hf, eos_token="<|sep|>", bos_token="<|cls|>", chat_template=template)
    assert (custom.eot_id, custom.bos_id) == (4, 3)
    loaded = Tokenizer.load(custom.save(tmp_path / "t"))
    assert (loaded.eot_id, loaded.bos_id, loaded.chat_template) == (4, 3, template)


def test_token_bytes_hold_even_part_of_a_character(tok):
    """A byte-level token may hold part of a multi-byte character: `decode([t])` writes U+FFFD for
    it, `token_bytes(t)` gives its raw bytes, so the tokens' bytes are exactly the text's."""
    text = "".join(SAMPLES[1:11])  # emoji, CJK, accents, and special tokens inside the text
    ids = tok.encode(text)
    assert b"".join(tok.token_bytes(i) for i in ids) == text.encode("utf-8")
    partial = [i for i in ids if "\ufffd" in tok.decode([i])]
    assert partial and all(b"\xef\xbf\xbd" not in tok.token_bytes(i) for i in partial)
    assert tok.token_bytes(tok.eot_id) == b"<|endoftext|>"
    assert all(tok.token_bytes(i) == tok.decode([i]).encode() for i in ids if i not in partial)


def test_too_large_vocab_is_one_line_not_an_out_of_memory_abort():
    # HF's trainer reserves room for the whole vocabulary up front: 1e11 entries aborts the process.
    with pytest.raises(UserError, match="too large.*--vocab-size"):
        Tokenizer.train(CORPUS, vocab_size=100_000_000_000, show_progress=False)


def test_literal_special_tokens_in_training_text_buy_no_merges():
    """Encoding matches a literal `<|endoftext|>` as the special token, so training must not learn
    merges for its pieces (`<|`, `|>`, `endoftext`), nor merges across it ("x<|endoftext|>y" is "x", "y")."""
    texts = ["hello world <|endoftext|> foo bar<|pad|>\n" * 50 + f"x{i}<|endoftext|>y{i}" for i in range(50)]
    tok = Tokenizer.train(texts, vocab_size=300, show_progress=False)
    vocab = set(tok.hf.get_vocab())
    pieces = [t for t in vocab - set(SPECIAL_TOKENS) if len(t) > 1 and any(s in t for s in ("<", "|", ">", "end", "pad"))]
    assert pieces == []
    assert {"Ġworld", "Ġfoo", "Ġbar"} <= vocab
    assert tok.encode("a<|endoftext|>b")[1] == tok.eot_id


def _write_config(tmp_path, tok, config):
    tok.save(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    return tmp_path


def test_hugging_face_added_token_objects_are_read_for_their_content(tok, tmp_path):
    added = {"__type": "AddedToken", "content": "<|sep|>", "lstrip": False, "normalized": False, "rstrip": False}
    config = {"eos_token": added, "bos_token": {"content": "<|cls|>"}, "pad_token": added, "unk_token": None}
    loaded = Tokenizer.load(_write_config(tmp_path, tok, config))
    assert (loaded.eot_id, loaded.bos_id) == (4, 3)


def test_a_list_of_named_chat_templates_uses_the_default(tok, tmp_path):
    templates = [{"name": "tool_use", "template": "TOOLS"}, {"name": "default", "template": "{{ messages[0]['content'] }}!"}]
    loaded = Tokenizer.load(_write_config(tmp_path, tok, {"chat_template": templates}))
    assert loaded.apply_chat_template([{"role": "user", "content": "hi"}]) == "hi!"


@pytest.mark.parametrize(
    "config, message",
    [
        (["eos_token", "<|sep|>"], "not a JSON object"),
        ({"eos_token": 5}, "eos_token"),
        ({"bos_token": {"__type": "AddedToken"}}, "bos_token"),
        ({"chat_template": [{"name": "tool_use", "template": "T"}]}, "no template named 'default'.*tool_use"),
        ({"chat_template": [{"name": "default"}]}, "chat_template"),
        ({"chat_template": {"default": "x"}}, "chat_template"),
    ],
)
def test_malformed_tokenizer_config_is_one_line(tok, tmp_path, config, message):
    with pytest.raises(UserError, match=message):
        Tokenizer.load(_write_config(tmp_path, tok, config))


def test_long_unbroken_runs_train_in_pieces_and_encode_whole():
    from lmforge.tokenizer.bpe import LONG_RUN, _training_pieces

    run = "ab" * 600  # 1,200 letters without a space: minified code, base64
    text = f"a line <|endoftext|> then {run}, and more"
    pieces = list(_training_pieces([text, "short"]))
    assert "".join(pieces) == text.replace("<|endoftext|>", "") + "short"  # nothing lost but the special
    assert max(map(len, pieces)) == LONG_RUN and pieces[-1] == "short"
    assert all(len(p) <= LONG_RUN or " " in p for p in pieces)
    assert pieces[2].startswith(" abab")  # a run keeps the space before it, as the pre-tokenizer keeps it on the word
    tok = Tokenizer.train([text * 3], vocab_size=300, show_progress=False)
    assert tok.decode(tok.encode(run)) == run  # encoding reads the run whole


def test_ctrl_c_during_the_merges_lands_at_once():
    """HF's merges run in Rust, where Python cannot raise KeyboardInterrupt: the interrupt lands while
    they still run (their thread is alive), not after the whole training has finished."""
    rng = random.Random(0)
    words = [" ".join("".join(rng.choices("abcdefghij", k=rng.randint(4, 9))) for _ in range(20)) for _ in range(5000)]

    def texts():  # interrupts the main thread once HF has read everything, i.e. as the merges start
        yield from words
        _thread.interrupt_main()

    # Python's own SIGINT handler, which earlier tests' servers (uvicorn) may have replaced.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            Tokenizer.train(texts(), vocab_size=30_000, min_frequency=1, show_progress=False)
        assert any(t.name == "lmforge-bpe-train" and t.is_alive() for t in threading.enumerate())
    finally:
        signal.signal(signal.SIGINT, previous)


def test_saving_to_an_empty_path_is_refused(tok, tmp_path, monkeypatch):
    """An empty --out (an unset variable) would write into the current directory and print "-> /tokenizer.json"."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="empty"):
        tok.save("")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("template, message", [
    ("{{ raise_exception('only user and assistant roles') }}", r"\(TemplateError: only user and assistant roles\)"),
    ("{% for m in messages %}{{ m['content'] + 1 }}{% endfor %}", r"\(TypeError: can only concatenate str"),
    ("{{ 1 // (messages | length - 1) }}", r"\(ZeroDivisionError: integer division or modulo by zero\); fix the chat template$"),
    ("{% if %}", r"\(TemplateSyntaxError: Expected an expression"),
])
def test_a_failing_chat_template_is_one_line(tok, template, message):
    """The template is a file's code: whatever it raises while rendering is the template's failure."""
    kept, tok.chat_template = tok.chat_template, template
    try:
        with pytest.raises(UserError, match=message):
            tok.encode_chat([{"role": "user", "content": "hi"}])
    finally:
        tok.chat_template = kept


def test_a_corpus_reads_only_end_of_text_as_a_special_token(tok):
    """`encode_batch(..., eot_only=True)` is how `prepare` reads a corpus: a literal end-of-text separates
    documents (TinyStories), the other special tokens' text is text (tiktoken's allowed_special). `encode`
    keeps the HF default of matching them all."""
    text = "story<|endoftext|>next <|pad|><|mask|>x<|cls|><|sep|><|endoftext|>"
    plain = tokenizers.Tokenizer.from_str(tok.to_str())
    plain.encode_special_tokens = True
    pieces = text.split("<|endoftext|>")
    expected = plain.encode(pieces[0]).ids + [0] + plain.encode(pieces[1]).ids + [0]
    assert tok.encode_batch([text, "a<|pad|>"], eot_only=True) == [expected, plain.encode("a<|pad|>").ids]
    assert not {1, 2, 3, 4} & set(expected)
    assert tok.encode(text) == tok.encode_batch([text])[0] == tok.hf.encode(text, add_special_tokens=False).ids
    assert {0, 1, 2, 3, 4} <= set(tok.encode(text))


def test_saving_leaves_no_earlier_chat_template_file_behind(tok, tmp_path):
    """`load` reads chat_template.jinja before tokenizer_config.json: one left by the tokenizer saved there
    before (an imported Hugging Face folder) gave the new tokenizer the old template."""
    out = tmp_path / "t"
    out.mkdir()
    (out / "chat_template.jinja").write_text("OLD {{ messages[0]['content'] }}")
    assert Tokenizer.load(tok.save(out)).chat_template is None
    (out / "chat_template.jinja").write_text("OLD {{ messages[0]['content'] }}")
    with_template = Tokenizer(tok.hf, chat_template="NEW {{ messages[0]['content'] }}")
    assert Tokenizer.load(with_template.save(out)).apply_chat_template([{"role": "user", "content": "hi"}]) == "NEW hi"


CHAT_TEMPLATES = {  # what transformers' environment has beyond Jinja's defaults
    "loop controls (Qwen)": "{% for m in messages %}{% if m['role'] == 'system' %}{% continue %}{% endif %}"
                            "{% if loop.index > 3 %}{% break %}{% endif %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}",
    "tojson": "{{ messages | tojson }}\n{{ messages[1] | tojson(indent=2) }}\n"
              "{{ {'b': 1, 'a': [1, 2]} | tojson(separators=(',', ':'), sort_keys=true) }}",
    "strftime_now (Llama 3)": "Today Date: {{ strftime_now('%d %b %Y') }}\n{{ messages[-1]['content'] }}",
    "generation mark": "{% for m in messages %}{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}"
                       "{% endgeneration %}{% else %}{{ m['content'] }}{% endif %}{% endfor %}",
}


@pytest.mark.parametrize("template", CHAT_TEMPLATES.values(), ids=CHAT_TEMPLATES.keys())
def test_chat_templates_render_as_transformers_renders_them(tok, template):
    from transformers import PreTrainedTokenizerFast

    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "Héllo <b> & 'q' ü 😀"},
                {"role": "assistant", "content": "ok"}, {"role": "user", "content": "again"}]
    theirs = PreTrainedTokenizerFast(tokenizer_object=tok.hf, eos_token="<|endoftext|>")
    theirs.chat_template = template
    ours = Tokenizer(tok.hf, chat_template=template)
    assert ours.apply_chat_template(messages) == theirs.apply_chat_template(messages, tokenize=False,
                                                                             add_generation_prompt=True)


def test_training_a_tokenizer_replaces_its_output_whole_or_not_at_all(tmp_path, monkeypatch):
    """A disk filling up between tokenizer.json and tokenizer_config.json left the new tokenizer beside
    the old one's special tokens; the earlier tokenizer must stay complete instead."""
    import errno
    import os

    from lmforge.data import train_tokenizer

    (tmp_path / "a.txt").write_text("the cat sat on the mat\n" * 50)
    out = tmp_path / "tok"
    train_tokenizer([tmp_path / "a.txt"], vocab_size=300, out=out, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    (tmp_path / "a.txt").write_text("a different corpus, other merges\n" * 50)
    fsync = os.fsync
    calls = []

    def full(fd):  # the first file fits, the second does not
        calls.append(fd)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match="No space left"):
        train_tokenizer([tmp_path / "a.txt"], vocab_size=300, out=out, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "tok"]  # no half-written sibling


def test_training_a_tokenizer_will_not_replace_a_folder_of_other_files(tmp_path):
    from lmforge.data import train_tokenizer

    (tmp_path / "a.txt").write_text("the cat sat on the mat\n" * 50)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    with pytest.raises(UserError, match=r"notes exists and is not a tokenizer directory \(it holds todo.txt\); pass"):
        train_tokenizer([tmp_path / "a.txt"], vocab_size=300, out=tmp_path / "notes", progress=False)
    assert (tmp_path / "notes" / "todo.txt").read_text() == "mine"


def test_a_template_that_trims_the_messages_still_keeps_their_special_token_text_as_text(tok):
    """`{{ m['content'] | trim }}` (as many templates write it) puts a message in without its surrounding
    whitespace: its place is still found, so the <|endoftext|> it spells is text, the template's own the token."""
    template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] | trim }}{{ eos_token }}\n{% endfor %}"
    chat = Tokenizer(tok.hf, chat_template=template)
    messages = [{"role": "user", "content": " \n say <|endoftext|> now\t "}]
    text = chat.apply_chat_template(messages)
    assert text == "user: say <|endoftext|> now<|endoftext|>\n"
    assert chat.message_spans(messages, True, text) == [(6, 6 + len("say <|endoftext|> now"))]
    plain = tokenizers.Tokenizer.from_str(tok.to_str())
    plain.encode_special_tokens = True
    expected = tok.encode("user: say ") + plain.encode("<|endoftext|>").ids + tok.encode(" now") + [tok.eot_id] + tok.encode("\n")
    assert chat.encode_chat(messages) == expected
    assert expected.count(tok.eot_id) == 1


def test_token_bytes_of_an_id_outside_the_vocabulary_are_empty(tok):
    """A model padded past its vocabulary may sample such an id; `decode` skips it, so it has no bytes
    (-1 is no token either, not the last one as Python's indexing would read it)."""
    last = tok.vocab_size - 1
    assert tok.token_bytes(last) != b"" and tok.token_bytes(0) == b"<|endoftext|>"
    assert [tok.token_bytes(i) for i in (-1, -tok.vocab_size, tok.vocab_size, tok.vocab_size + 100)] == [b""] * 4
    assert tok.decode([tok.vocab_size]) == ""


@pytest.mark.parametrize("min_frequency, merged", [
    (5, ["el", "hel", "hello", "lo"]),  # "Ġh" is seen 4 times: not merged, nor "Ġhello"
    (2, ["el", "hel", "hello", "lo", "Ġhello"]),
    (1, ["el", "hel", "hello", "lo", "qz", "Ġhello", "Ġqz"]),
])
def test_training_merges_only_pairs_seen_min_frequency_times(tmp_path, min_frequency, merged):
    from lmforge.data import train_tokenizer

    (tmp_path / "a.txt").write_text("hello hello hello hello hello qz")
    tok = train_tokenizer([tmp_path / "a.txt"], vocab_size=400, out=tmp_path / "tok", min_frequency=min_frequency,
                          progress=False)
    assert sorted(t for t, i in tok.hf.get_vocab().items() if i >= 261) == merged
    assert tok.vocab_size == 261 + len(merged)
    assert Tokenizer.load(tmp_path / "tok").sha256 == tok.sha256


def test_a_chat_template_writes_the_tokenizers_bos_token(tok):
    """`{{ bos_token }}` is the text of the declared begin-of-text token (Llama's <s>), "" where there is none."""
    template = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{{ eos_token }}{% endfor %}"
    messages = [{"role": "user", "content": "hi"}]
    with_bos = Tokenizer(tok.hf, bos_token="<|cls|>", eos_token="<|sep|>", chat_template=template)
    assert with_bos.apply_chat_template(messages) == "<|cls|>hi<|sep|>"
    assert with_bos.encode_chat(messages) == [tok.cls_id, *tok.encode("hi"), tok.sep_id]
    assert Tokenizer(tok.hf, chat_template=template).apply_chat_template(messages) == "hi<|endoftext|>"
