"""GGUF (llama.cpp's format): read Llama-architecture files, dequantize, rebuild the tokenizer.

Layout (GGUF v2/v3, little-endian): magic "GGUF", version u32, tensor count u64, metadata count
u64; metadata key/value pairs; tensor infos (name, dims with the fastest-varying first, ggml
type, offset); padding to `general.alignment` (32); tensor data. Quantized tensors are blocks of
32 values (ggml's QK4_0 = QK4_1 = QK8_0 = 32):

    Q8_0: f16 d, 32 x i8 q          value = d * q
    Q4_0: f16 d, 16 bytes of nibbles value = d * (nibble - 8)
    Q4_1: f16 d, f16 m, 16 bytes     value = d * nibble + m
    (byte j holds element j in its low nibble and element j + 16 in its high nibble)
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import tokenizers
from tokenizers import Regex, decoders, models, pre_tokenizers, processors

from lmforge.checkpoint import check_checkpoint_out, save_checkpoint
from lmforge.config import ModelConfig
from lmforge.interop._keys import REQUIRED, check_shape, model_config, read_key, some_names
from lmforge.model import Transformer
from lmforge.tokenizer import Tokenizer
from lmforge.utils.errors import UserError, first_line

# ggml tensor types lmforge can dequantize: name, bytes per block, values per block.
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 4, 1),
    1: ("F16", 2, 1),
    2: ("Q4_0", 18, 32),
    3: ("Q4_1", 20, 32),
    8: ("Q8_0", 34, 32),
    30: ("BF16", 2, 1),
}
_UNSUPPORTED_NAMES = {6: "Q5_0", 7: "Q5_1", 9: "Q8_1", 10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K"}

# Metadata value types: struct format for the scalar ones.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


@dataclass
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # torch order (slowest first)
    ggml_type: int
    offset: int


@dataclass
class GGUFFile:
    path: Path
    metadata: dict[str, Any]
    tensors: dict[str, TensorInfo]
    data_start: int

    def tensor(self, name: str) -> torch.Tensor:
        """Tensor `name` dequantized to float32."""
        if name not in self.tensors:
            raise UserError(f"{self.path}: tensor {name!r} is missing; the file does not match its metadata")
        info = self.tensors[name]
        type_name, block_bytes, block_values = GGML_TYPES[info.ggml_type]
        n = int(np.prod(info.shape))
        nbytes = n // block_values * block_bytes
        raw = np.memmap(self.path, dtype=np.uint8, mode="r", offset=self.data_start + info.offset, shape=(nbytes,))
        return torch.from_numpy(dequantize(np.asarray(raw), type_name, n).reshape(info.shape))


def dequantize(raw: np.ndarray, type_name: str, n: int) -> np.ndarray:
    """float32 values of `n` elements stored as `type_name` in the bytes `raw`."""
    if type_name == "F32":
        return raw.view("<f4").astype(np.float32)
    if type_name == "F16":
        return raw.view("<f2").astype(np.float32)
    if type_name == "BF16":
        return (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)
    if type_name == "Q8_0":
        blocks = raw.reshape(-1, 34)
        d = blocks[:, :2].copy().view("<f2").astype(np.float32)  # (nb, 1)
        q = blocks[:, 2:].view(np.int8).astype(np.float32)  # (nb, 32)
        return (d * q).reshape(n)
    if type_name in ("Q4_0", "Q4_1"):
        head = 2 if type_name == "Q4_0" else 4
        blocks = raw.reshape(-1, head + 16)
        d = blocks[:, :2].copy().view("<f2").astype(np.float32)
        qs = blocks[:, head:]
        nibbles = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float32)  # (nb, 32): low half, then high
        if type_name == "Q4_0":
            return (d * (nibbles - 8.0)).reshape(n)
        m = blocks[:, 2:4].copy().view("<f2").astype(np.float32)
        return (d * nibbles + m).reshape(n)
    raise UserError(f"GGUF tensor type {type_name} is not supported")


def read_gguf(path: str | Path) -> GGUFFile:
    """Parse a GGUF file's header, metadata and tensor index (tensor data stays on disk)."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path} is a directory; pass a .gguf file (for a Hugging Face directory use `lmforge import hf`)")
    if not path.is_file():
        raise UserError(f"{path} does not exist; pass a .gguf file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        reader = _Reader(f, path, size)
        if reader.read(4) != b"GGUF":
            raise UserError(f"{path} is not a GGUF file (bad magic); pass a llama.cpp .gguf file")
        version = reader.unpack("<I")
        if version not in (2, 3):
            raise UserError(f"{path}: GGUF version {version} is not supported (2 and 3 are)")
        n_tensors, n_kv = reader.unpack("<Q"), reader.unpack("<Q")
        # the least one entry takes: a key (length, text) with a type and a one-byte value; a tensor's name,
        # dimension count, type and offset
        reader.need(n_kv, 8 + 4 + 1, "the metadata count")
        reader.need(n_tensors, 8 + 4 + 4 + 8, "the tensor count")
        metadata = {}
        for _ in range(n_kv):
            key = reader.string()
            metadata[key] = reader.value(reader.unpack("<I"))
        tensors = {}
        for _ in range(n_tensors):
            name = reader.string()
            dims = [reader.unpack("<Q") for _ in range(reader.need(reader.unpack("<I"), 8, "a dimension count"))]
            ggml_type, offset = reader.unpack("<I"), reader.unpack("<Q")
            if ggml_type not in GGML_TYPES:
                kind = _UNSUPPORTED_NAMES.get(ggml_type, f"type {ggml_type}")
                raise UserError(
                    f"{path}: tensor {name} is quantized as {kind}, which lmforge cannot dequantize "
                    f"(supported: {', '.join(t[0] for t in GGML_TYPES.values())}); requantize the model to one of them"
                )
            type_name, _, block_values = GGML_TYPES[ggml_type]
            if (dims[0] if dims else 1) % block_values:  # ggml quantizes each row in whole blocks
                raise UserError(
                    f"{path}: tensor {name} has rows of {dims[0] if dims else 1} values, not a whole number of "
                    f"{type_name}'s block of {block_values}; the file is corrupt, re-download it"
                )
            tensors[name] = TensorInfo(name, tuple(reversed(dims)), ggml_type, offset)
        alignment = read_key(metadata, "general.alignment", int, path, _GGUF_FIX, 32)
        data_start = -(-f.tell() // alignment) * alignment
    for info in tensors.values():
        _, block_bytes, block_values = GGML_TYPES[info.ggml_type]
        end = data_start + info.offset + math.prod(info.shape) // block_values * block_bytes  # exact: no int64 wrap
        if end > size:
            raise UserError(f"{path} is truncated ({size} bytes, tensor {info.name} ends at {end}); re-download it")
    return GGUFFile(path, metadata, tensors, data_start)


class _Reader:
    """Reads the header fields; every length or count is checked against the bytes the file has left, so
    that a corrupt one is "truncated or corrupt", never a huge allocation or an overflow."""

    def __init__(self, f, path: Path, size: int) -> None:
        self.f, self.path, self.size = f, path, size

    def corrupt(self, what: str) -> UserError:
        return UserError(f"{self.path} is truncated or corrupt ({what}); re-download it")

    def need(self, count: int, each: int, what: str) -> int:
        """`count`, after checking that `count` items of at least `each` bytes fit in what is left."""
        left = self.size - self.f.tell()
        if count * each > left:
            raise self.corrupt(f"{what} {count:,} needs at least {count * each:,} bytes at byte {self.f.tell():,}, "
                               f"{left:,} are left")
        return count

    def read(self, n: int) -> bytes:
        left = self.size - self.f.tell()
        if n > left:
            raise self.corrupt(f"{n:,} bytes wanted at byte {self.f.tell():,}, {left:,} are left")
        data = self.f.read(n)
        if len(data) != n:
            raise self.corrupt("its header ends early")
        return data

    def unpack(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.read(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        return self.read(self.need(self.unpack("<Q"), 1, "a string of length")).decode("utf-8", errors="replace")

    def value(self, vtype: int) -> Any:
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            item_type, count = self.unpack("<I"), self.unpack("<Q")
            # the least an item takes: a scalar's size, a string's length field, a nested array's type and count
            each = struct.calcsize(_SCALARS[item_type]) if item_type in _SCALARS else 12 if item_type == _ARRAY else 8
            self.need(count, each, "an array of length")
            if item_type in _SCALARS and item_type != 7:  # numeric arrays: read in one go
                dtype = np.dtype(_SCALARS[item_type])
                return np.frombuffer(self.read(dtype.itemsize * count), dtype=dtype).tolist()
            return [self.value(item_type) for _ in range(count)]
        raise UserError(f"{self.path}: unknown metadata value type {vtype}; the file is corrupt")


# ----------------------------------------------------------------------------------------- llama
def config_from_gguf(g: GGUFFile) -> ModelConfig:
    md = g.metadata
    arch = md.get("general.architecture")
    if arch != "llama":
        raise UserError(f"{g.path}: GGUF architecture {arch!r} is not supported; only llama")
    if "rope_freqs.weight" in g.tensors:
        # Llama 3.1+ files carry their RoPE scaling as per-frequency factors; ignoring them would give
        # silently wrong logits past the original context, so refuse instead.
        raise UserError(f"{g.path}: per-frequency RoPE factors (rope_freqs, Llama 3.1 style) are not supported yet")
    def a(key: str, kind: type = int, default: Any = REQUIRED) -> Any:
        return read_key(md, f"llama.{key}", kind, g.path, _GGUF_FIX, default)

    n_head, n_embd = a("attention.head_count"), a("embedding_length")
    # lmforge's heads are n_embd / n_head wide and rotate whole: a file that says otherwise (Mistral-Nemo's
    # key_length 128 with 5120 / 32 = 160; partial rotary) would load into the wrong shapes or rotate too much.
    head_size = n_embd // n_head
    for key, unsupported in (("attention.key_length", "heads of another size are"),
                             ("attention.value_length", "heads of another size are"),
                             ("rope.dimension_count", "rotating only part of each head (partial rotary) is")):
        value = a(key, int, head_size)
        if value != head_size:
            raise UserError(f"{g.path}: 'llama.{key}' is {value}, but lmforge's head size is embedding_length / "
                            f"head_count = {n_embd} / {n_head} = {head_size}; {unsupported} not supported")
    scaling: dict[str, Any] = {}
    kind = a("rope.scaling.type", str, None)
    if kind == "linear":
        scaling = {"rope_scaling": "linear", "rope_factor": a("rope.scaling.factor", float)}
    elif kind not in (None, "none"):
        raise UserError(f"{g.path}: RoPE scaling {kind!r} is not supported; supported: none, linear")
    fields = dict(
        vocab_size=a("vocab_size", int, None) or len(_tokens(g)), context_length=a("context_length"),
        n_layer=a("block_count"), n_head=n_head, n_kv_head=a("attention.head_count_kv", int, n_head),
        n_embd=n_embd, mlp_hidden=a("feed_forward_length"), position="rotary",
        rope_theta=a("rope.freq_base", float, 10000.0), norm="rmsnorm", mlp="swiglu", bias=False,
        norm_eps=a("attention.layer_norm_rms_epsilon", float, 1e-5), tie_embeddings="output.weight" not in g.tensors,
        pad_vocab_multiple=1, **scaling,
    )
    return model_config(g.path, **fields)


_GGUF_FIX = "re-download the file or convert the model again with llama.cpp"


def _strings(g: GGUFFile, key: str, default: Any = REQUIRED) -> list[str]:
    """The array of strings at `key` (the vocabulary, the merges)."""
    values = read_key(g.metadata, key, list, g.path, _GGUF_FIX, default)
    if not all(isinstance(v, str) for v in values) or (default is REQUIRED and not values):
        raise UserError(f"{g.path}: {key!r} must be a non-empty array of strings; {_GGUF_FIX}")
    return values


def _tokens(g: GGUFFile) -> list[str]:
    return _strings(g, "tokenizer.ggml.tokens")


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's reordering of q/k rows (interleaved rotary pairs -> "rotate half" halves)."""
    rows, cols = w.shape
    hs = rows // n_head
    return w.reshape(n_head, hs // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def state_dict_from_gguf(g: GGUFFile, c: ModelConfig, used: set[str] | None = None) -> dict[str, torch.Tensor]:
    """lmforge state dict from the file's tensors; `used`, when given, receives the names read."""
    used = set() if used is None else used

    def t(name: str, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """Tensor `name`; one that is fused with others is checked first to have `shape`."""
        used.add(name)
        return g.tensor(name) if shape is None else check_shape(g.tensor(name), name, shape, f"the metadata of {g.path}")

    E, q_rows, kv_rows = c.n_embd, c.n_head * c.head_size, c.kv_heads * c.head_size
    sd = {"tok_embeddings.weight": t("token_embd.weight"), "norm.weight": t("output_norm.weight")}
    for i in range(c.n_layer):
        p, q = f"blk.{i}.", f"layers.{i}."
        sd[q + "attention_norm.weight"] = t(p + "attn_norm.weight")
        sd[q + "ffn_norm.weight"] = t(p + "ffn_norm.weight")
        sd[q + "attention.qkv.weight"] = torch.cat([
            _unpermute(t(p + "attn_q.weight", (q_rows, E)), c.n_head), _unpermute(t(p + "attn_k.weight", (kv_rows, E)), c.kv_heads),
            t(p + "attn_v.weight", (kv_rows, E)),
        ])
        sd[q + "attention.proj.weight"] = t(p + "attn_output.weight")
        sd[q + "feed_forward.fc.weight"] = torch.cat([t(p + f"ffn_{n}.weight", (c.hidden_size, E)) for n in ("gate", "up")])
        sd[q + "feed_forward.proj.weight"] = t(p + "ffn_down.weight")
    if not c.tie_embeddings:
        sd["output.weight"] = t("output.weight")
    return sd


# llama.cpp's pre-tokenizers (src/llama-vocab.cpp, llm_tokenizer_bpe), by `tokenizer.ggml.pre`: the regexes it
# splits text with, one after another, each keeping what it does not match as pieces too, before byte-level BPE.
# The splits are those of each model's own tokenizer.json, so an export to Hugging Face carries the same rule.
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
# Meta's tokenizer.json spelling; llama.cpp writes the contractions as '[sS] etc. for std::regex (the same on ASCII).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# llama.cpp's fallback for a file without `pre` (it warns that generation quality degrades).
_DEFAULT_SPLITS = (r"[\p{P}\$\+<=>\^~\|]+", _GPT2_SPLIT, r"\p{N}+", r"[0-9][0-9][0-9]")
# kind -> the `pre` names llama.cpp gives it. llama3: the word is looked up whole before any merge
# (ignore_merges, as in Llama 3's tokenizer.json) and BOS is added unless the file says otherwise.
_PRE_NAMES = {
    "gpt2": ("gpt-2", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v1-en", "jina-v2-es", "jina-v2-de",
             "jina-v2-code", "roberta-bpe", "mpt", "olmo", "jais"),
    "digits": ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"),
    "llama3": ("llama3", "llama-v3", "llama-bpe", "falcon3"),
    "llama3-split": ("dbrx", "smaug-bpe"),
    "default": ("default",),
}
_PRE_KIND = {name: kind for kind, names in _PRE_NAMES.items() for name in names}
# llama.cpp token types: 2 UNKNOWN and 3 CONTROL are special tokens (<|im_start|>, <|endoftext|>);
# 4 USER_DEFINED (<think>, <tool>) is matched whole in any text, but is not special.
_SPECIAL_TYPES, _USER_DEFINED = (2, 3), 4


def _pre_tokenizer(g: GGUFFile) -> tuple[pre_tokenizers.PreTokenizer, str]:
    """The pre-tokenizer llama.cpp uses for this file's `tokenizer.ggml.pre`, and its kind (see _PRE_NAMES)."""
    pre = g.metadata.get("tokenizer.ggml.pre", "default")
    kind = _PRE_KIND.get(pre) if isinstance(pre, str) else None
    if kind is None:
        raise UserError(
            f"{g.path}: 'tokenizer.ggml.pre' is {pre!r}, a pre-tokenizer lmforge does not implement "
            f"(it knows {', '.join(sorted(_PRE_KIND))}); import the model's Hugging Face directory with `lmforge import hf`"
        )
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    if kind == "gpt2":
        return pre_tokenizers.ByteLevel(add_prefix_space=False), kind  # its built-in regex is GPT-2's
    if kind == "digits":  # as SmolLM2's tokenizer.json: each \p{N} alone, then GPT-2's regex
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False)]), kind
    splits = _DEFAULT_SPLITS if kind == "default" else (_LLAMA3_SPLIT,)
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(r), "isolated") for r in splits] + [byte_level]), kind


def tokenizer_from_gguf(g: GGUFFile) -> Tokenizer:
    """Rebuild a byte-level BPE tokenizer (`tokenizer.ggml.model` = gpt2) from the GGUF metadata, splitting
    text as llama.cpp does for the file's `tokenizer.ggml.pre`."""
    md = g.metadata
    kind = md.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise UserError(f"{g.path}: GGUF tokenizer model {kind!r} is not supported; only gpt2 (byte-level BPE)")
    pre_tokenizer, pre_kind = _pre_tokenizer(g)
    tokens = _tokens(g)
    merges = [tuple(m.split(" ", 1)) for m in _strings(g, "tokenizer.ggml.merges", [])]
    if (bad := next((i for i, m in enumerate(merges) if len(m) != 2), None)) is not None:
        raise UserError(f"{g.path}: merge {bad} of 'tokenizer.ggml.merges' is {merges[bad][0]!r}, not two tokens separated "
                        f"by a space; {_GGUF_FIX}")
    try:
        hf = tokenizers.Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                                             ignore_merges=pre_kind == "llama3"))
    except Exception as e:  # the tokenizers library's check (a merge of tokens not in the vocabulary) raises a bare Exception
        raise UserError(f"{g.path}: 'tokenizer.ggml.tokens' and 'tokenizer.ggml.merges' do not make a BPE tokenizer "
                        f"({first_line(e)}); {_GGUF_FIX}") from None
    hf.pre_tokenizer = pre_tokenizer
    hf.decoder = decoders.ByteLevel()
    types = read_key(md, "tokenizer.ggml.token_type", list, g.path, _GGUF_FIX, [])
    if len(types) > len(tokens):  # a type per token: more would mark tokens that are not there
        raise UserError(f"{g.path}: 'tokenizer.ggml.token_type' has {len(types)} entries but 'tokenizer.ggml.tokens' "
                        f"{len(tokens)}; {_GGUF_FIX}")
    hf.add_special_tokens([tokenizers.AddedToken(tokens[i], special=True, normalized=False)
                           for i, t in enumerate(types) if t in _SPECIAL_TYPES])
    hf.add_tokens([tokenizers.AddedToken(tokens[i], special=False, normalized=False)
                   for i, t in enumerate(types) if t == _USER_DEFINED])
    ids = {}
    # eot and eom: llama.cpp ends a generation at these as at eos (Llama 3's <|eot_id|> and <|eom_id|>)
    for role in ("bos", "eos", "padding", "eot", "eom"):
        key = f"tokenizer.ggml.{role}_token_id"
        if key in md:
            i = md[key]
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(tokens):
                raise UserError(f"{g.path}: {key!r} is {i!r}, not a token id (the vocabulary has {len(tokens)} tokens); {_GGUF_FIX}")
            ids[role] = i
    roles = {role: tokens[i] for role, i in ids.items()}
    # llama.cpp adds BOS (and EOS) when it tokenizes with add_special. That is the post-processor here, as in
    # Llama 3's tokenizer.json: HF-style encoding with special tokens adds them; lmforge's `encode` adds none.
    add = {role: read_key(md, f"tokenizer.ggml.add_{role}_token", bool, g.path, _GGUF_FIX, default)
           for role, default in (("bos", pre_kind == "llama3"), ("eos", False))}
    missing = [role for role, on in add.items() if on and role not in ids]
    if missing:
        raise UserError(f"{g.path}: 'tokenizer.ggml.add_{missing[0]}_token' is true (or its pre-tokenizer's default) but "
                        f"'tokenizer.ggml.{missing[0]}_token_id' is missing; {_GGUF_FIX}")
    if any(add.values()):
        bos, eos = ([roles[r]] if add[r] else [] for r in ("bos", "eos"))
        hf.post_processor = processors.TemplateProcessing(
            single=[*bos, "$A", *eos], pair=[*bos, "$A", *eos, *(f"{t}:1" for t in bos), "$B:1", *(f"{t}:1" for t in eos)],
            special_tokens=[(roles[r], ids[r]) for r in ("bos", "eos") if add[r]],
        )
    return Tokenizer(
        hf, origin=str(g.path), eos_token=roles.get("eos"), bos_token=roles.get("bos"), pad_token=roles.get("padding"),
        chat_template=read_key(md, "tokenizer.chat_template", str, g.path, _GGUF_FIX, None),
        end_ids=[ids[role] for role in ("eot", "eom") if role in ids],
    )


def import_gguf(path: str | Path, out: str | Path) -> Path:
    """Convert a Llama-architecture GGUF file to an lmforge checkpoint (weights in float32)."""
    check_checkpoint_out(out, path)  # before the work: never over the file itself, a run, or another kind
    g = read_gguf(path)
    config = config_from_gguf(g)
    tokenizer = tokenizer_from_gguf(g)
    model = Transformer(config)
    used: set[str] = set()
    sd = state_dict_from_gguf(g, config, used)
    unused = set(g.tensors) - used
    if unused:
        raise UserError(
            f"{g.path}: {len(unused)} of its tensors are not part of the model its metadata describes "
            f"({some_names(unused)}); the file is inconsistent "
            "(is llama.block_count right?)"
        )
    for name, p in model.state_dict().items():
        if name in sd and sd[name].shape != p.shape:
            raise UserError(
                f"{g.path}: tensor for {name} has shape {tuple(sd[name].shape)} but the metadata implies "
                f"{tuple(p.shape)}; the file is inconsistent"
            )
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if set(missing) - {"output.weight"} or unexpected:
        raise UserError(f"{g.path}: weights do not match the architecture (missing {missing[:3]})")
    return save_checkpoint(out, model, tokenizer)
