"""GGUF tokenizers and attention shapes, on tiny files written with the `gguf` package's own writer.

llama.cpp reads `tokenizer.ggml.pre` to pick the regexes it splits text with before byte-level BPE
(src/llama-vocab.cpp, llm_tokenizer_bpe). The references here are those rules written out
independently, as the models' own tokenizer.json files state them (Llama 3: Split(regex) then
ByteLevel without its regex, BPE with ignore_merges; SmolLM2: Digits(individual) then ByteLevel),
or the pieces llama.cpp gives, by hand.
"""

import re
from pathlib import Path

import numpy as np
import pytest
import tokenizers
from tokenizers import Regex, decoders, models, pre_tokenizers

from lmforge.interop.gguf import import_gguf, read_gguf, tokenizer_from_gguf
from lmforge.utils.errors import UserError

gguf = pytest.importorskip("gguf")

# Llama 3's split, as in Meta's tokenizer.json (llama.cpp spells the contractions [sS] etc.: the same on ASCII).
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
ALPHABET = sorted(pre_tokenizers.ByteLevel.alphabet())  # every byte has a token, as in a real byte-level vocabulary


def write_gguf(path: Path, tokens: list[str], merges: list[str] = (), pre: str | None = None, types: list[int] | None = None,
               head_size: int = 4, extra=lambda w: None) -> Path:
    """A Llama GGUF: d_model 8, 2 query heads and 1 key/value head of `head_size`, FFN 16, one block."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(16)
    w.add_embedding_length(8)
    w.add_block_count(1)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    w.add_head_count_kv(1)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("gpt2")
    if pre is not None:
        w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    if merges:
        w.add_token_merges(list(merges))
    w.add_token_types(types if types is not None else [3] + [1] * (len(tokens) - 1))
    w.add_eos_token_id(0)
    extra(w)
    rng = np.random.default_rng(0)
    hd = head_size
    shapes = {"token_embd.weight": (len(tokens), 8), "output_norm.weight": (8,), "blk.0.attn_norm.weight": (8,),
              "blk.0.ffn_norm.weight": (8,), "blk.0.attn_q.weight": (2 * hd, 8), "blk.0.attn_k.weight": (hd, 8),
              "blk.0.attn_v.weight": (hd, 8), "blk.0.attn_output.weight": (8, 2 * hd), "blk.0.ffn_gate.weight": (16, 8),
              "blk.0.ffn_up.weight": (16, 8), "blk.0.ffn_down.weight": (8, 16)}
    for name, shape in shapes.items():
        w.add_tensor(name, rng.normal(size=shape).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def pieces(tok, text: str) -> list[str]:
    return [tok.hf.id_to_token(i) for i in tok.encode(text)]


def reference(tokens: list[str], merges: list[str], pre_tokenizer, ignore_merges: bool = False) -> tokenizers.Tokenizer:
    ref = tokenizers.Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, [tuple(m.split(" ")) for m in merges],
                                          ignore_merges=ignore_merges))
    ref.pre_tokenizer = pre_tokenizer
    ref.decoder = decoders.ByteLevel()
    return ref


# ------------------------------------------------------------------------------------------ pre-tokenizers
LLAMA3_TOKENS = ["<|end_of_text|>", "<|begin_of_text|>", *ALPHABET, "12", "34", "345", "123", "'M", "ĠI", "xyz", "<tool>"]
LLAMA3_MERGES = ["3 4", "1 2", "34 5", "12 3", "' M", "Ġ I"]  # "xyz" has no merges: only ignore_merges finds it whole
BOS = lambda w: w.add_bos_token_id(1)  # noqa: E731  <|begin_of_text|>


def test_llama_bpe_splits_digits_in_threes_and_contractions_of_any_case(tmp_path):
    path = write_gguf(tmp_path / "l3.gguf", LLAMA3_TOKENS, LLAMA3_MERGES, pre="llama-bpe", extra=BOS)
    tok = tokenizer_from_gguf(read_gguf(path))
    assert pieces(tok, "12345") == ["123", "4", "5"]  # GPT-2's regex: ["12", "345"]
    assert pieces(tok, "I'M") == ["I", "'M"]  # GPT-2's regex, case-sensitive: ["I", "'", "M"]
    assert pieces(tok, "xyz") == ["xyz"]  # ignore_merges: a word in the vocabulary is one token
    ref = reference(LLAMA3_TOKENS, LLAMA3_MERGES, pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), "isolated"), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]),
        ignore_merges=True)
    for text in ["12345 1234567", "I'M you'RE they'll", "x\n\n  y  \r\n z", "a1b22c333", " !!?\n", "Ünïcödé 😀 ½²"]:
        assert tok.encode(text) == ref.encode(text).ids, text
        assert tok.decode(tok.encode(text)) == text


def test_smollm_splits_every_numeral_first(tmp_path):
    """pre=smollm: \\p{N} characters one by one, then GPT-2's regex (HF's SmolLM2 tokenizer.json: Digits, ByteLevel)."""
    tokens, merges = ["<|endoftext|>", *ALPHABET, "12", "ĠÂ", "Â½"], ["1 2", "Ġ Â", "Â ½"]
    tok = tokenizer_from_gguf(read_gguf(write_gguf(tmp_path / "s.gguf", tokens, merges, pre="smollm")))
    assert pieces(tok, "x 12 ½") == ["x", "Ġ", "1", "2", "Ġ", "Â½"]  # GPT-2 alone: x, Ġ, 12, ĠÂ, ½
    ref = reference(tokens, merges, pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]))
    for text in ["add ½ cup; 3 m² ¼", "x = 12345 + 678", "Ⅻ ٣ 12"]:
        assert tok.encode(text) == ref.encode(text).ids, text


@pytest.mark.parametrize("pre", ["gpt-2", None])
def test_gpt2_and_missing_pre_tokenizers(pre, tmp_path):
    """gpt-2: GPT-2's regex. No pre at all: llama.cpp's 'default' (it warns that quality degrades), which first
    isolates runs of punctuation and then cuts digit runs into threes."""
    tokens, merges = ["<|endoftext|>", *ALPHABET, "12", "34", "345", "'t", "Ġ1"], ["1 2", "3 4", "34 5", "' t", "Ġ 1"]
    tok = tokenizer_from_gguf(read_gguf(write_gguf(tmp_path / "g.gguf", tokens, merges, pre=pre)))
    if pre == "gpt-2":
        assert pieces(tok, "12345 don't") == ["12", "345", "Ġ", "d", "o", "n", "'t"]
    else:  # "[\p{P}...]+" takes the apostrophe alone, and digit runs are cut after three
        assert pieces(tok, "12345 don't") == ["12", "3", "4", "5", "Ġ", "d", "o", "n", "'", "t"]
        assert pieces(tok, "x 12345") == ["x", "Ġ", "12", "3", "4", "5"]  # "\p{N}+" parts the space from the digits


def test_unknown_pre_tokenizer_is_refused_in_one_line(tmp_path):
    path = write_gguf(tmp_path / "q.gguf", ["<|endoftext|>", *ALPHABET], pre="qwen2")
    with pytest.raises(UserError, match=r"q\.gguf.*tokenizer\.ggml\.pre.*'qwen2'") as err:
        tokenizer_from_gguf(read_gguf(path))
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="'qwen2'"):
        import_gguf(path, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()



@pytest.mark.parametrize("merges, types, says", [
    (["ab"], None, "merge 0 of 'tokenizer.ggml.merges' is 'ab', not two tokens separated by a space"),
    (["a b", "zz q"], None, "'tokenizer.ggml.tokens' and 'tokenizer.ggml.merges' do not make a BPE tokenizer"),
    ([], [3] * 300, "'tokenizer.ggml.token_type' has 300 entries but 'tokenizer.ggml.tokens' 258"),
])
def test_a_damaged_tokenizer_is_one_line(merges, types, says, tmp_path):
    """Seen in review: tracebacks from the tokenizers library (a merge without its space, a merge of
    tokens not in the vocabulary) and an IndexError (more token types than tokens)."""
    tokens = ["<|endoftext|>", *ALPHABET, "ab"]
    path = write_gguf(tmp_path / "bad.gguf", tokens, merges, types=types)
    with pytest.raises(UserError, match=re.escape(says)) as err:
        import_gguf(path, tmp_path / "ckpt")
    assert "\n" not in str(err.value) and not (tmp_path / "ckpt").exists()


# ------------------------------------------------------------------------------------------ special tokens
def test_user_defined_tokens_are_matched_whole(tmp_path):
    """Type 4 (USER_DEFINED, `<think>`, `<tool>`): llama.cpp matches them whole, even where control tokens are
    read as text; they are not special (decoding keeps them, as it keeps every token here)."""
    types = [3, 3] + [1] * (len(LLAMA3_TOKENS) - 3) + [4]
    path = write_gguf(tmp_path / "u.gguf", LLAMA3_TOKENS, LLAMA3_MERGES, pre="llama-bpe", types=types, extra=BOS)
    tok = tokenizer_from_gguf(read_gguf(path))
    tool = LLAMA3_TOKENS.index("<tool>")
    assert tok.encode("<tool>") == [tool]
    assert tok.encode("a<tool>b") == [tok.hf.token_to_id("a"), tool, tok.hf.token_to_id("b")]
    assert tok.decode(tok.encode("a<tool>b")) == "a<tool>b" and tok.token_bytes(tool) == b"<tool>"
    literal = tokenizers.Tokenizer.from_str(tok.hf.to_str())
    literal.encode_special_tokens = True  # control tokens read as text (lmforge does so for chat messages): <tool> stays whole
    assert literal.encode("<tool><|end_of_text|>", add_special_tokens=False).ids[:2] == [tool, tok.hf.token_to_id("<")]


def test_add_bos_token_prepends_bos_and_survives_the_checkpoint(tmp_path):
    """add_bos_token: llama.cpp prepends BOS when it tokenizes with add_special. Kept as the tokenizer.json
    post-processor (as in Llama 3's own tokenizer.json), so HF-style encoding with special tokens adds it;
    lmforge's `encode` adds no special token by itself (lmforge.tokenizer)."""
    from lmforge.checkpoint import load_checkpoint

    def bos(add):
        return lambda w: (w.add_bos_token_id(1), add is not None and w.add_add_bos_token(add))

    for pre, add, expected in [("llama-bpe", True, True), ("llama-bpe", None, True), ("llama-bpe", False, False),
                               ("smollm", None, False), ("smollm", True, True)]:
        path = write_gguf(tmp_path / f"{pre}-{add}.gguf", LLAMA3_TOKENS, LLAMA3_MERGES, pre=pre, extra=bos(add))
        tok = tokenizer_from_gguf(read_gguf(path))
        a = tok.hf.token_to_id("a")
        assert tok.hf.encode("a").ids == ([1, a] if expected else [a]), (pre, add)
        assert tok.encode("a") == [a] and tok.bos_id == 1
    saved = load_checkpoint(import_gguf(tmp_path / "llama-bpe-True.gguf", tmp_path / "ckpt")).tokenizer
    assert saved.hf.encode("a").ids == [1, saved.hf.token_to_id("a")]
    path = write_gguf(tmp_path / "nobos.gguf", LLAMA3_TOKENS, LLAMA3_MERGES, pre="llama-bpe")
    with pytest.raises(UserError, match=r"nobos\.gguf.*add_bos_token.*bos_token_id"):
        tokenizer_from_gguf(read_gguf(path))


# ------------------------------------------------------------------------------------------ attention shapes
def test_partial_rotary_is_refused_naming_the_key(tmp_path):
    """rope.dimension_count < head size: llama.cpp rotates only the first dims of each head; lmforge would rotate all."""
    tokens = ["<|endoftext|>", *"abcdefg"]
    path = write_gguf(tmp_path / "p.gguf", tokens, extra=lambda w: w.add_rope_dimension_count(2))
    with pytest.raises(UserError, match=r"p\.gguf.*'llama\.rope\.dimension_count' is 2.*head size .* = 4.*partial rotary") as err:
        import_gguf(path, tmp_path / "ckpt")
    assert "\n" not in str(err.value) and not (tmp_path / "ckpt").exists()
    # equal to the head size (as every Llama writes it) imports
    import_gguf(write_gguf(tmp_path / "f.gguf", tokens, extra=lambda w: w.add_rope_dimension_count(4)), tmp_path / "ok")


@pytest.mark.parametrize("key", ["key_length", "value_length"])
def test_head_size_other_than_embedding_over_heads_is_refused_naming_the_key(key, tmp_path):
    path = write_gguf(tmp_path / "k.gguf", ["<|endoftext|>", *"abcdefg"], head_size=8,
                      extra=lambda w: getattr(w, f"add_{key}")(8))
    with pytest.raises(UserError, match=rf"k\.gguf.*'llama\.attention\.{key}' is 8.*4") as err:
        import_gguf(path, tmp_path / "ckpt")
    assert "\n" not in str(err.value) and "inconsistent" not in str(err.value)
