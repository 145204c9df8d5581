"""Tokenizers made elsewhere: roles declared in tokenizer_config.json, chat_template.jinja,
BERT's WordPiece vocabulary, and the bytes of SentencePiece-style ('▁') tokens."""

import json

import pytest
import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

from lmforge.tokenizer import Tokenizer
from lmforge.utils.errors import UserError

TEXT = ("The quick brown fox jumps over the lazy dog. Größe, Straße, 你好 🙂\n" * 30
        + "  two leading spaces and\r\nCRLF lines, and trailing  \n" * 30)


def _save(tmp_path, hf, config=None):
    hf.save(str(tmp_path / "tokenizer.json"))
    if config is not None:
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    return tmp_path


def _bpe(*specials):
    hf = tokenizers.Tokenizer(models.BPE(vocab={"a": 0, "b": 1}, merges=[]))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens(list(specials))
    return hf


@pytest.mark.parametrize("eos,others", [("<eos>", ()), ("<|end|>", ("<|endoftext|>",))])
def test_declared_eos_token_is_read_before_names_are_searched(tmp_path, eos, others):
    """Gemma's <eos> and Phi-3's <|end|> are no name lmforge knows: the declared one must be used, and
    it wins over a known name the vocabulary also holds."""
    tok = Tokenizer.load(_save(tmp_path, _bpe(eos, "<bos>", *others), {"eos_token": eos, "bos_token": "<bos>"}))
    assert (tok.hf.id_to_token(tok.eot_id), tok.bos_id) == (eos, 3)


def test_declared_eos_token_missing_from_the_vocabulary_is_one_line(tmp_path):
    with pytest.raises(UserError, match=r"no end-of-text token.*'<eos>'.*tokenizer_config.json") as err:
        Tokenizer.load(_save(tmp_path, _bpe("<|endoftext|>"), {"eos_token": "<eos>"}))
    assert "\n" not in str(err.value)


def test_chat_template_jinja_takes_precedence_over_tokenizer_config(tmp_path):
    """transformers 5 saves the template to chat_template.jinja; when both exist, the file wins (as in
    transformers' PreTrainedTokenizerBase.from_pretrained)."""
    d = _save(tmp_path, _bpe("<|endoftext|>"), {"eos_token": "<|endoftext|>", "chat_template": "OLD"})
    assert Tokenizer.load(d).chat_template == "OLD"
    (d / "chat_template.jinja").write_text("{{ messages[0]['content'] }}!", encoding="utf-8")
    tok = Tokenizer.load(d)
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "hi!"
    (d / "tokenizer_config.json").unlink()  # the file alone is read too
    assert Tokenizer.load(d).chat_template == "{{ messages[0]['content'] }}!"


def _wordpiece(names=("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")):
    vocab = {t: i for i, t in enumerate([*names, "the", "fox", "##es", "a", "b"])}
    hf = tokenizers.Tokenizer(models.WordPiece(vocab, unk_token=names[1]))
    hf.normalizer = normalizers.BertNormalizer(lowercase=True)
    hf.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    hf.decoder = decoders.WordPiece()
    hf.add_special_tokens(list(names))
    return hf


def test_bert_wordpiece_tokenizer_loads_with_its_roles(tmp_path):
    """BERT has no end-of-text token: an encoder's text ends in [SEP], so that is its end token. Its
    markers are found under BERT's names, or under the names tokenizer_config.json gives them."""
    tok = Tokenizer.load(_save(tmp_path, _wordpiece(), {"do_lower_case": True}))
    assert (tok.pad_id, tok.cls_id, tok.sep_id, tok.mask_id, tok.eot_id, tok.bos_id) == (0, 2, 3, 4, 3, None)
    assert tok.encode("The foxes") == [5, 6, 7]

    names = ("<pad>", "<unk>", "<s>", "</s>", "<mask>")  # RoBERTa's names, declared
    config = {"pad_token": "<pad>", "cls_token": "<s>", "sep_token": "</s>", "mask_token": {"content": "<mask>"}}
    tok = Tokenizer.load(_save(tmp_path, _wordpiece(names), config))
    assert (tok.pad_id, tok.cls_id, tok.sep_id, tok.mask_id, tok.eot_id) == (0, 2, 3, 4, 3)


def test_roles_survive_save_and_load(tmp_path):
    names = ("<pad>", "<unk>", "<s>", "</s>", "<mask>")
    config = {"pad_token": "<pad>", "cls_token": "<s>", "sep_token": "</s>", "mask_token": "<mask>", "eos_token": "</s>"}
    (tmp_path / "a").mkdir()
    tok = Tokenizer.load(_save(tmp_path / "a", _wordpiece(names), config))
    loaded = Tokenizer.load(tok.save(tmp_path / "b"))
    assert [loaded.pad_id, loaded.mask_id, loaded.cls_id, loaded.sep_id, loaded.eot_id] == [0, 4, 2, 3, 3]
    saved = json.loads((tmp_path / "b" / "tokenizer_config.json").read_text())
    assert {k: saved[k] for k in config} == config


def _sentencepiece(decoder, prepend):
    """A Llama-2-style tokenizer.json: BPE over '▁'-for-space pieces with byte fallback."""
    hf = tokenizers.Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    hf.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never")  # words as pieces, for training only
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    hf.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=420, special_tokens=["<unk>", "<s>", "</s>", *byte_tokens],
                                                       show_progress=False))
    j = json.loads(hf.to_str())
    j["added_tokens"] = [t for t in j["added_tokens"] if t["content"] in ("<unk>", "<s>", "</s>")]
    hf = tokenizers.Tokenizer.from_str(json.dumps(j))
    if decoder == "llama2":  # Replace, ByteFallback, Fuse, Strip; a normalizer writes '▁' for spaces
        hf.pre_tokenizer = None
        hf.normalizer = normalizers.Sequence([normalizers.Prepend("▁")] * prepend + [normalizers.Replace(" ", "▁")])
        hf.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                        *[decoders.Strip(" ", 1, 0)] * prepend])
    else:  # the newer spelling: a Metaspace pre-tokenizer and decoder
        hf.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first" if prepend else "never")
        hf.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace(prepend_scheme="first" if prepend else "never")])
    return hf


@pytest.mark.parametrize("decoder", ["llama2", "metaspace"])
@pytest.mark.parametrize("prepend", [True, False])
def test_token_bytes_of_sentencepiece_tokens_keep_their_spaces(tmp_path, decoder, prepend):
    """Decoding a '▁' token alone drops its space (the decoder strips the first one of a text), so the
    tokens' bytes lost every word's space. A token's bytes are its piece with '▁' as a space, byte
    tokens <0xNN> their byte: the tokens of a text give back its bytes (after the space a prepending
    normalizer puts in front of it)."""
    tok = Tokenizer.load(_save(tmp_path, _sentencepiece(decoder, prepend), {"eos_token": "</s>", "bos_token": "<s>"}))
    for text in ["Hello world, how are you?", "  two leading spaces\r\nCRLF", "emoji 🙂 and ünïcödé 你好", "the lazy dog"]:
        ids = tok.encode(text)
        assert any(tok.hf.id_to_token(i).startswith("<0x") for i in ids) or "emoji" not in text
        # Llama 2's normalizer puts '▁' before every text; Metaspace's "first" before one that has no space there
        expected = (" " if prepend and (decoder == "llama2" or text[0] != " ") else "") + text
        assert b"".join(tok.token_bytes(i) for i in ids) == expected.encode("utf-8")
    word = tok.hf.token_to_id("▁the")
    assert word is not None and tok.token_bytes(word) == b" the"
    assert tok.token_bytes(tok.eot_id) == b"</s>"


def test_a_prompt_gets_the_bos_the_tokenizer_adds_as_transformers_gives_it(tmp_path):
    """Llama 3's tokenizer.json puts <|begin_of_text|> before a text; transformers (and vLLM) give a
    prompt that BOS, once. lmforge's own tokenizers add nothing, so their prompts are `encode`'s."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    hf = tokenizers.Tokenizer(models.BPE(vocab={c: i for i, c in enumerate("abcdefgh ")}, merges=[]))
    hf.add_special_tokens(["<|begin_of_text|>", "<|end_of_text|>"])
    bos = hf.token_to_id("<|begin_of_text|>")
    hf.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", bos)])
    tok = Tokenizer.load(_save(tmp_path, hf, {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}))
    theirs = PreTrainedTokenizerFast(tokenizer_object=hf)
    for text in ("abc dea", "", "<|begin_of_text|>abc"):
        want = theirs(text).input_ids
        if text.startswith("<|begin_of_text|>"):
            want = want[1:]  # transformers doubles a BOS the text spells; lmforge keeps the one
        assert tok.encode_prompt(text) == want
    assert tok.prompt_prefix == (bos,) and tok.encode("abc") == tok.encode_prompt("abc")[1:]
    plain = Tokenizer.load(_save(tmp_path / "plain", _bpe("<|endoftext|>")) if (tmp_path / "plain").mkdir() is None else None)
    assert plain.prompt_prefix == () and plain.encode_prompt("ab") == plain.encode("ab")


@pytest.mark.parametrize("decoder", ["llama2", "metaspace"])
def test_a_corpus_matches_only_the_declared_end_of_text(tmp_path, decoder):
    """Reading a corpus (`encode_batch(..., eot_only=True)`), Llama 2's "</s>" is still its end-of-text,
    exactly as `encode` matches it (the normalizer's '▁' included), and its "<s>" is text."""
    tok = Tokenizer.load(_save(tmp_path, _sentencepiece(decoder, True), {"eos_token": "</s>", "bos_token": "<s>"}))
    text = "The quick fox</s>the lazy dog</s>"
    assert tok.encode_batch([text], eot_only=True)[0] == tok.encode(text) and tok.encode(text).count(tok.eot_id) == 2
    spelled = "The <s> fox"
    plain = tokenizers.Tokenizer.from_str(tok.to_str())
    plain.encode_special_tokens = True
    assert tok.encode_batch([spelled], eot_only=True)[0] == plain.encode(spelled).ids
    assert tok.bos_id in tok.encode(spelled) and tok.bos_id not in plain.encode(spelled).ids


def test_roles_name_the_unknown_token_of_the_vocabulary(tmp_path):
    """The unknown token was no role: an export's tokenizer_config.json lacked it, and transformers loaded
    BERT's and SentencePiece's vocabularies with unk_token None. Byte-level BPE needs none."""
    for name in ("wp", "sp"):
        (tmp_path / name).mkdir()
    wordpiece = Tokenizer.load(_save(tmp_path / "wp", _wordpiece()))
    sentencepiece = Tokenizer.load(_save(tmp_path / "sp", _sentencepiece("llama2", True), {"eos_token": "</s>"}))
    assert (wordpiece.roles()["unk_token"], sentencepiece.roles()["unk_token"]) == ("[UNK]", "<unk>")
    assert (wordpiece.unk_id, sentencepiece.unk_id) == (1, 0)
    assert "unk_token" not in Tokenizer(_bpe("<|endoftext|>")).roles()


def test_declared_role_tokens_win_over_tokens_with_a_known_name(tmp_path):
    """A vocabulary may hold lmforge's <|pad|> and BERT's [PAD] beside the token its tokenizer_config.json
    declares as the pad token: the declared one is the role, for every role found by name."""
    known = ["<|pad|>", "[PAD]", "<|mask|>", "[MASK]", "<|cls|>", "[CLS]", "<|sep|>", "[SEP]"]
    declared = {"pad_token": "<pad>", "mask_token": "<mask>", "cls_token": "<s>", "sep_token": "</s>"}
    hf = _bpe("<|endoftext|>", *known, *declared.values())
    tok = Tokenizer.load(_save(tmp_path, hf, declared))
    assert [tok.pad_id, tok.mask_id, tok.cls_id, tok.sep_id] == [11, 12, 13, 14]
    assert {k: tok.roles()[k] for k in declared} == declared
    (tmp_path / "tokenizer_config.json").unlink()  # nothing declared: the known names, lmforge's first
    tok = Tokenizer.load(tmp_path)
    assert [tok.pad_id, tok.mask_id, tok.cls_id, tok.sep_id] == [3, 5, 7, 9]
