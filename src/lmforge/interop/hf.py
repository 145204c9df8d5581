"""Hugging Face format: `config.json` + safetensors + `tokenizer.json`, for GPT-2, Llama and BERT.

Import maps HF names onto lmforge's (fusing q/k/v and gate/up projections, transposing GPT-2's
Conv1D weights); export undoes it, so `transformers`' Auto classes load the result with no missing
or unexpected weights. BERT's task classes import too: a head the class lacks starts afresh (as in
transformers), and a classification, tagging or QA layer becomes lmforge's task head.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable

import tokenizers
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tokenizers import processors

from lmforge.checkpoint import check_checkpoint_out, is_hf_config, load_model, save_checkpoint
from lmforge.checkpoint.store import check_tokenizer_fits
from lmforge.config import ModelConfig
from lmforge.interop._keys import REQUIRED, check_shape, model_config, read_key, some_names
from lmforge.model import Transformer
from lmforge.tokenizer import GENERATION_FILE, Tokenizer
from lmforge.utils.errors import UserError
from lmforge.utils.fs import (
    atomic_dir,
    atomic_write_json,
    atomic_write_text,
    check_replaceable,
    out_dir,
    read_json,
    read_json_object,
    usual_mode,
)

Tensors = dict[str, torch.Tensor]
_HF_FIX = "pass a Hugging Face model directory (re-download it if it is damaged)"
EXPORT_MARKER = "lmforge_export.json"  # written by export alone: the mark of a directory it may replace


# ---------------------------------------------------------------------------------------- configs
def config_from_hf(hf: Any, source: str | Path = "config.json") -> ModelConfig:
    """The lmforge config of a Hugging Face `config.json` (GPT-2, Llama or BERT) read from `source`.

    A missing key, a value of the wrong type or a setting lmforge does not model is a one-line
    UserError naming the key and `source`.
    """
    if not isinstance(hf, dict):
        raise UserError(f"{source} must be a JSON object of settings, not a {type(hf).__name__}; {_HF_FIX}")

    def get(key: str, kind: type, default: Any = REQUIRED) -> Any:
        return read_key(hf, key, kind, source, _HF_FIX, default)

    if "model_type" not in hf and isinstance(hf.get("model"), dict):
        raise UserError(f"{source} belongs to an lmforge checkpoint, not a Hugging Face model; use that checkpoint directly")
    kind = get("model_type", str)
    if kind == "gpt2":
        act = get("activation_function", str, "gelu_new")
        if act not in _GPT2_ACT:
            raise UserError(f"{source}: GPT-2 activation {act!r} is not supported; supported: {sorted(_GPT2_ACT)}")
        for flag, default in _GPT2_ATTENTION.items():
            if get(flag, bool, default) != default:
                raise UserError(
                    f"{source}: GPT-2 with {flag}={not default} is not supported; lmforge's attention scales "
                    f"scores by 1/sqrt(head size) alone, as GPT-2's default {flag}={default}"
                )
        fields = dict(
            vocab_size=get("vocab_size", int), context_length=get("n_positions", int), n_layer=get("n_layer", int),
            n_head=get("n_head", int), n_embd=get("n_embd", int), mlp_hidden=get("n_inner", int, None), position="learned",
            norm="layernorm", mlp=_GPT2_ACT[act], bias=True, norm_eps=get("layer_norm_epsilon", float, 1e-5),
            tie_embeddings=get("tie_word_embeddings", bool, True), pad_vocab_multiple=1,
            dropout=get("resid_pdrop", float, 0.1),
        )
    elif kind == "llama":
        if get("hidden_act", str, "silu") != "silu":
            raise UserError(f"{source}: Llama activation {hf['hidden_act']!r} is not supported; only silu (SwiGLU)")
        if get("attention_bias", bool, False) or get("mlp_bias", bool, False):
            raise UserError(f"{source}: Llama checkpoints with attention_bias or mlp_bias are not supported yet")
        hidden, heads = get("hidden_size", int), get("num_attention_heads", int)
        head_dim = get("head_dim", int, None) or hidden // heads
        if head_dim * heads != hidden:
            raise UserError(f"{source}: head_dim {head_dim} x heads != hidden_size {hidden}: not supported yet")
        fields = dict(
            vocab_size=get("vocab_size", int), context_length=get("max_position_embeddings", int),
            n_layer=get("num_hidden_layers", int), n_head=heads, n_kv_head=get("num_key_value_heads", int, heads),
            n_embd=hidden, mlp_hidden=get("intermediate_size", int), position="rotary", norm="rmsnorm",
            mlp="swiglu", bias=False, norm_eps=get("rms_norm_eps", float, 1e-6),
            tie_embeddings=get("tie_word_embeddings", bool, False), pad_vocab_multiple=1, **_rope_from_hf(hf, source),
            dropout=get("attention_dropout", float, 0.0),
        )
    elif kind == "bert":
        if get("hidden_act", str, "gelu") != "gelu" or get("position_embedding_type", str, "absolute") != "absolute":
            raise UserError(f"{source}: BERT variants other than GELU with absolute positions are not supported yet")
        fields = dict(
            _bert_task(hf, (get("architectures", list, None) or ["BertForPreTraining"])[0], get("is_decoder", bool, False), source),
            arch="encoder", vocab_size=get("vocab_size", int), context_length=get("max_position_embeddings", int),
            n_layer=get("num_hidden_layers", int), n_head=get("num_attention_heads", int), n_embd=get("hidden_size", int),
            mlp_hidden=get("intermediate_size", int), position="learned", norm="layernorm", norm_position="post",
            embed_norm=True, type_vocab_size=get("type_vocab_size", int, 2), mlp="gelu", bias=True,
            norm_eps=get("layer_norm_eps", float, 1e-12), tie_embeddings=get("tie_word_embeddings", bool, True),
            pad_vocab_multiple=1, dropout=get("hidden_dropout_prob", float, 0.1),
        )
    else:
        raise UserError(f"{source}: Hugging Face model_type {kind!r} is not supported; supported: gpt2, llama, bert")
    return model_config(source, **fields)


# lmforge has one dropout (embeddings, attention weights, residual branches). It is read from GPT-2's
# resid_pdrop and BERT's hidden_dropout_prob, and written to all of their dropouts; Llama has only
# attention_dropout, which is read and written as it.
_GPT2_ACT = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}
# GPT-2 attention switches and their defaults, the only values lmforge's attention computes.
_GPT2_ATTENTION = {"scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False}


# The BERT classes import takes: each one's lmforge task head (its HF layer in _BERT_TASK_LAYER).
_BERT_CLASSES = {
    "BertForPreTraining": "none", "BertForMaskedLM": "none", "BertModel": "none", "BertForNextSentencePrediction": "none",
    "BertForSequenceClassification": "classify", "BertForTokenClassification": "tag", "BertForQuestionAnswering": "span",
}
_BERT_TASK_LAYER = {"classify": "classifier", "tag": "classifier", "span": "qa_outputs"}


def _bert_task(hf: dict[str, Any], arch: Any, is_decoder: bool, source: str | Path) -> dict[str, Any]:
    """The task head and labels of a BERT config.json's class (`architectures[0]`)."""
    if arch not in _BERT_CLASSES or is_decoder:
        what = f"{arch} with is_decoder true (a causal BERT)" if is_decoder else repr(arch)
        raise UserError(f"{source}: BERT class {what} is not supported; supported: {', '.join(_BERT_CLASSES)}")
    task = _BERT_CLASSES[arch]
    if task not in ("classify", "tag"):
        return {"task_head": task}
    id2label = read_key(hf, "id2label", dict, source, _HF_FIX, {"0": "LABEL_0", "1": "LABEL_1"})
    if not all(isinstance(k, str) and k.isdigit() and isinstance(v, str) for k, v in id2label.items()) \
            or sorted(map(int, id2label)) != list(range(len(id2label))):
        raise UserError(f"{source}: 'id2label' is not a map from 0..n-1 to label names; {_HF_FIX}")
    problem = read_key(hf, "problem_type", str, source, _HF_FIX, "single_label_classification")
    if task == "classify" and (problem != "single_label_classification" or len(id2label) < 2):
        raise UserError(f"{source}: a {problem} head ({len(id2label)} labels) is not supported; "
                        "lmforge's classify head picks one of two or more labels")
    return {"task_head": task, "labels": [id2label[str(i)] for i in range(len(id2label))]}


def _rope_from_hf(hf: dict[str, Any], source: str | Path) -> dict[str, Any]:
    # transformers >= 5 keeps theta and scaling in `rope_parameters`; older files in rope_theta/rope_scaling.
    params = read_key(hf, "rope_parameters", dict, source, _HF_FIX, {})
    scaling = read_key(hf, "rope_scaling", dict, source, _HF_FIX, {})
    theta = read_key(params, "rope_theta", float, source, _HF_FIX, None, "rope_parameters.")
    theta = read_key(hf, "rope_theta", float, source, _HF_FIX, 10000.0) if theta is None else theta
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    src, where = (params, "rope_parameters.") if "rope_type" in params else (scaling, "rope_scaling.")

    def get(key: str) -> float:
        return read_key(src, key, float, source, _HF_FIX, prefix=where)

    if kind == "default":
        return {"rope_theta": theta}
    if kind == "linear":
        return {"rope_theta": theta, "rope_scaling": "linear", "rope_factor": get("factor")}
    if kind == "llama3":
        return {
            "rope_theta": theta, "rope_scaling": "llama3", "rope_factor": get("factor"),
            "rope_low_freq_factor": get("low_freq_factor"), "rope_high_freq_factor": get("high_freq_factor"),
            "rope_original_context": read_key(src, "original_max_position_embeddings", int, source, _HF_FIX, prefix=where),
        }
    raise UserError(f"{source}: RoPE scaling {kind!r} is not supported for import; supported: default, linear, llama3")


def config_to_hf(c: ModelConfig, tokenizer: Tokenizer | None = None) -> dict[str, Any]:
    """A Hugging Face `config.json` for an lmforge config that has an HF equivalent."""
    pad = {"pad_token_id": tokenizer.pad_id} if tokenizer and tokenizer.pad_id is not None else {}
    special = {"eos_token_id": tokenizer.eot_id, "bos_token_id": _bos_id(tokenizer), **pad} if tokenizer else {}
    family = _family(c)
    if family == "bert":
        return {
            "architectures": ["BertForPreTraining"], "model_type": "bert", "vocab_size": c.vocab_size,
            "hidden_size": c.n_embd, "num_hidden_layers": c.n_layer, "num_attention_heads": c.n_head,
            "intermediate_size": c.hidden_size, "hidden_act": "gelu", "max_position_embeddings": c.context_length,
            "type_vocab_size": c.type_vocab_size, "layer_norm_eps": c.norm_eps, "tie_word_embeddings": c.tie_embeddings,
            "hidden_dropout_prob": c.dropout, "attention_probs_dropout_prob": c.dropout, "position_embedding_type": "absolute",
            **pad,
        }
    if family == "gpt2":
        act = {"gelu_tanh": "gelu_new", "gelu": "gelu"}[c.mlp]
        return {
            "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": c.vocab_size,
            "n_positions": c.context_length, "n_embd": c.n_embd, "n_layer": c.n_layer, "n_head": c.n_head,
            "n_inner": c.hidden_size, "activation_function": act, "layer_norm_epsilon": c.norm_eps,
            "tie_word_embeddings": c.tie_embeddings, "resid_pdrop": c.dropout, "embd_pdrop": c.dropout, "attn_pdrop": c.dropout,
            **special,
        }
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": c.rope_theta}
    if c.rope_scaling == "linear":
        rope.update(rope_type="linear", factor=c.rope_factor)
    elif c.rope_scaling == "llama3":
        rope.update(rope_type="llama3", factor=c.rope_factor, low_freq_factor=c.rope_low_freq_factor,
                    high_freq_factor=c.rope_high_freq_factor, original_max_position_embeddings=c.rope_original_context)
    legacy_scaling = {k: v for k, v in rope.items() if k != "rope_theta"} if c.rope_scaling != "none" else None
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": c.vocab_size,
        "hidden_size": c.n_embd, "intermediate_size": c.hidden_size, "num_hidden_layers": c.n_layer,
        "num_attention_heads": c.n_head, "num_key_value_heads": c.kv_heads, "head_dim": c.head_size,
        "max_position_embeddings": c.context_length, "rms_norm_eps": c.norm_eps, "hidden_act": "silu",
        "tie_word_embeddings": c.tie_embeddings, "attention_bias": False, "mlp_bias": False, "attention_dropout": c.dropout,
        # Both spellings, so that transformers before and after v5 read the same rotary settings.
        "rope_parameters": rope, "rope_theta": c.rope_theta, "rope_scaling": legacy_scaling,
        **special,
    }


def _bos_id(tokenizer: Tokenizer) -> int:
    """A decoder's BOS: the tokenizer's, or where it has none (GPT-2, lmforge's own) its EOS, as GPT-2's config has it."""
    return tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eot_id


def _family(c: ModelConfig) -> str:
    if c.qk_norm:
        raise UserError(
            "model.qk_norm has no equivalent in transformers' GPT-2, Llama or BERT; "
            "export supports models trained without --model.qk_norm"
        )
    if c.mlp == "relu2":
        raise UserError(
            "model.mlp=relu2 (ReLU squared) has no equivalent in transformers' GPT-2, Llama or BERT; "
            "export supports gelu/gelu_tanh (GPT-2, BERT) and swiglu (Llama) MLPs"
        )
    family = None
    if c.arch == "encoder":
        if (c.position, c.norm, c.norm_position, c.mlp, c.embed_norm, c.bias) == ("learned", "layernorm", "post", "gelu", True, True) \
                and c.type_vocab_size > 0 and c.kv_heads == c.n_head:
            family = "bert"
    elif c.arch == "decoder" and c.norm_position == "pre" and c.position == "learned" and c.norm == "layernorm" and c.mlp in ("gelu", "gelu_tanh") and c.bias and c.kv_heads == c.n_head:
        family = "gpt2"
    elif c.arch == "decoder" and c.norm_position == "pre" and c.position == "rotary" and c.norm == "rmsnorm" \
            and c.mlp == "swiglu" and not c.bias and c.rope_scaling != "ntk":
        family = "llama"
    # Embedding extras: transformers' GPT-2 and Llama add nothing to the token embedding (no scale, no
    # norm, no token types) and BERT adds no scale; exported anyway, the logits would silently differ.
    extras = [f"{name}={value}" for name, value, on in (
        ("embed_scale", c.embed_scale, c.embed_scale),
        ("embed_norm", c.embed_norm, c.embed_norm and family != "bert"),
        ("type_vocab_size", c.type_vocab_size, c.type_vocab_size > 0 and family != "bert"),
    ) if on and family is not None]
    if family is None or extras:
        raise UserError(
            f"this architecture (arch={c.arch}, position={c.position}, norm={c.norm}/{c.norm_position}, mlp={c.mlp}, bias={c.bias}, "
            f"rope_scaling={c.rope_scaling}{''.join(', ' + e for e in extras)}) has no Hugging Face equivalent; "
            "export supports GPT-2, Llama and BERT shapes"
        )
    return family


# ----------------------------------------------------------------------------------- weight names
# BERT names under `bert.` (BertForPreTraining) against lmforge's, per layer and outside the layers.
# The heads outside the encoder, which not every BERT class has (by lmforge's name prefix).
_BERT_HEADS = {"pooler": "pooler", "mlm": "masked-LM head", "nsp": "next-sentence head"}
_BERT_LAYER = {
    "attention.proj": "attention.output.dense", "attention_norm": "attention.output.LayerNorm",
    "feed_forward.fc": "intermediate.dense", "feed_forward.proj": "output.dense", "ffn_norm": "output.LayerNorm",
}
_BERT_TOP = {
    "tok_embeddings.weight": "bert.embeddings.word_embeddings.weight",
    "pos_embeddings.weight": "bert.embeddings.position_embeddings.weight",
    "type_embeddings.weight": "bert.embeddings.token_type_embeddings.weight",
    "embed_norm.weight": "bert.embeddings.LayerNorm.weight", "embed_norm.bias": "bert.embeddings.LayerNorm.bias",
    "pooler.dense.weight": "bert.pooler.dense.weight", "pooler.dense.bias": "bert.pooler.dense.bias",
    "mlm.dense.weight": "cls.predictions.transform.dense.weight", "mlm.dense.bias": "cls.predictions.transform.dense.bias",
    "mlm.norm.weight": "cls.predictions.transform.LayerNorm.weight", "mlm.norm.bias": "cls.predictions.transform.LayerNorm.bias",
    "mlm.decoder.bias": "cls.predictions.bias",
    "nsp.weight": "cls.seq_relationship.weight", "nsp.bias": "cls.seq_relationship.bias",
}


def _bert_from_hf(c: ModelConfig, hf: Tensors, get: Callable[..., torch.Tensor]) -> Tensors:
    """A head none of whose weights are in `hf` is left out (import_hf says it starts afresh)."""
    absent = {h for h in _BERT_HEADS if not any(theirs in hf for ours, theirs in _BERT_TOP.items() if ours.startswith(h + "."))}
    sd = {ours: get(theirs) for ours, theirs in _BERT_TOP.items() if ours.split(".")[0] not in absent}
    for i in range(c.n_layer):
        p, q = f"bert.encoder.layer.{i}.", f"layers.{i}."
        for w, shape in (("weight", (c.n_embd, c.n_embd)), ("bias", (c.n_embd,))):
            sd[f"{q}attention.qkv.{w}"] = torch.cat([get(f"{p}attention.self.{n}.{w}", shape) for n in ("query", "key", "value")])
            for ours, theirs in _BERT_LAYER.items():
                sd[f"{q}{ours}.{w}"] = get(f"{p}{theirs}.{w}")
    if c.task_head != "none":
        layer = _BERT_TASK_LAYER[c.task_head]
        sd["head.weight"], sd["head.bias"] = get(f"{layer}.weight"), get(f"{layer}.bias")
    if not c.tie_embeddings and "mlm" not in absent:
        sd["mlm.decoder.weight"] = get("cls.predictions.decoder.weight")
        # transformers >= 5 keeps an untied decoder's own bias, and that is the one its forward adds.
        if "cls.predictions.decoder.bias" in hf:
            sd["mlm.decoder.bias"] = get("cls.predictions.decoder.bias")
    return sd


def _bert_to_hf(c: ModelConfig, sd: Tensors) -> Tensors:
    out = {theirs: sd[ours] for ours, theirs in _BERT_TOP.items()}
    out["bert.embeddings.word_embeddings.weight"] = sd["tok_embeddings.weight"][: c.vocab_size]
    out["cls.predictions.bias"] = sd["mlm.decoder.bias"][: c.vocab_size]
    for i in range(c.n_layer):
        p, q = f"bert.encoder.layer.{i}.", f"layers.{i}."
        for w in ("weight", "bias"):
            for n, t in zip(("query", "key", "value"), sd[f"{q}attention.qkv.{w}"].chunk(3)):
                out[f"{p}attention.self.{n}.{w}"] = t
            for ours, theirs in _BERT_LAYER.items():
                out[f"{p}{theirs}.{w}"] = sd[f"{q}{ours}.{w}"]
    if not c.tie_embeddings:
        out["cls.predictions.decoder.weight"] = sd["mlm.decoder.weight"][: c.vocab_size]
        out["cls.predictions.decoder.bias"] = out["cls.predictions.bias"].clone()
    return {k: v.detach().contiguous() for k, v in out.items()}


def state_dict_from_hf(c: ModelConfig, hf: Tensors, used: set[str] | None = None) -> Tensors:
    """lmforge state dict from HF tensors (names with or without the `transformer.` or `bert.` prefix).

    `used`, when given, receives the names in `hf` that the mapping read, or that transformers itself
    ignores (buffers older versions saved, a tied head's copy of the embedding): what is left over
    is weights the config does not describe.
    """
    family = _family(c)
    if family == "bert" and not any(k.startswith("bert.") for k in hf):  # a bare BertModel saved on its own
        names = {(k if k.startswith("cls.") else "bert." + k): k for k in hf}
    else:
        names = {k.removeprefix("transformer."): k for k in hf}
    tensors = {ours: hf[k] for ours, k in names.items()}
    read: set[str] = {k for k in tensors if k.endswith(_HF_BUFFERS)}
    if c.tie_embeddings:
        read |= {"lm_head.weight", "cls.predictions.decoder.weight", "cls.predictions.decoder.bias"} & tensors.keys()
    get = _getter(tensors, read)
    sd = _bert_from_hf(c, tensors, get) if family == "bert" else _decoder_from_hf(c, family, get)
    if used is not None:
        used.update(names[k] for k in read)
    return sd


# Buffers, not weights, that some transformers versions saved: the causal mask of GPT-2's attention,
# Llama's rotary frequencies, BERT's position ids.
_HF_BUFFERS = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq", "embeddings.position_ids")


def _decoder_from_hf(c: ModelConfig, family: str, get: Callable[..., torch.Tensor]) -> Tensors:
    sd: Tensors = {}
    if family == "gpt2":
        sd["tok_embeddings.weight"] = get("wte.weight")
        sd["pos_embeddings.weight"] = get("wpe.weight")
        for i in range(c.n_layer):
            p, q = f"h.{i}.", f"layers.{i}."
            for ours, theirs in (("attention_norm", "ln_1"), ("ffn_norm", "ln_2")):
                sd[q + ours + ".weight"], sd[q + ours + ".bias"] = get(p + theirs + ".weight"), get(p + theirs + ".bias")
            # GPT-2's Conv1D stores (in, out): transpose to nn.Linear's (out, in).
            for ours, theirs in (("attention.qkv", "attn.c_attn"), ("attention.proj", "attn.c_proj"),
                                 ("feed_forward.fc", "mlp.c_fc"), ("feed_forward.proj", "mlp.c_proj")):
                sd[q + ours + ".weight"] = get(p + theirs + ".weight").t().contiguous()
                sd[q + ours + ".bias"] = get(p + theirs + ".bias")
        sd["norm.weight"], sd["norm.bias"] = get("ln_f.weight"), get("ln_f.bias")
    else:
        E, kv_rows = c.n_embd, c.kv_heads * c.head_size
        qkv_rows = (("q", c.n_head * c.head_size), ("k", kv_rows), ("v", kv_rows))
        sd["tok_embeddings.weight"] = get("model.embed_tokens.weight")
        for i in range(c.n_layer):
            p, q = f"model.layers.{i}.", f"layers.{i}."
            sd[q + "attention_norm.weight"] = get(p + "input_layernorm.weight")
            sd[q + "ffn_norm.weight"] = get(p + "post_attention_layernorm.weight")
            sd[q + "attention.qkv.weight"] = torch.cat([get(p + f"self_attn.{n}_proj.weight", (rows, E)) for n, rows in qkv_rows])
            sd[q + "attention.proj.weight"] = get(p + "self_attn.o_proj.weight")
            sd[q + "feed_forward.fc.weight"] = torch.cat([get(p + f"mlp.{n}_proj.weight", (c.hidden_size, E)) for n in ("gate", "up")])
            sd[q + "feed_forward.proj.weight"] = get(p + "mlp.down_proj.weight")
        sd["norm.weight"] = get("model.norm.weight")
    if not c.tie_embeddings:
        sd["output.weight"] = get("lm_head.weight")
    return sd


def state_dict_to_hf(c: ModelConfig, sd: Tensors) -> Tensors:
    """HF tensors (the names `from_pretrained` expects) from an lmforge state dict."""
    V = c.vocab_size
    out: Tensors = {}
    family = _family(c)
    if family == "bert":
        return _bert_to_hf(c, sd)
    if family == "gpt2":
        out["transformer.wte.weight"] = sd["tok_embeddings.weight"][:V]
        out["transformer.wpe.weight"] = sd["pos_embeddings.weight"]
        for i in range(c.n_layer):
            p, q = f"transformer.h.{i}.", f"layers.{i}."
            for ours, theirs in (("attention_norm", "ln_1"), ("ffn_norm", "ln_2")):
                out[p + theirs + ".weight"], out[p + theirs + ".bias"] = sd[q + ours + ".weight"], sd[q + ours + ".bias"]
            for ours, theirs in (("attention.qkv", "attn.c_attn"), ("attention.proj", "attn.c_proj"),
                                 ("feed_forward.fc", "mlp.c_fc"), ("feed_forward.proj", "mlp.c_proj")):
                out[p + theirs + ".weight"] = sd[q + ours + ".weight"].t()
                out[p + theirs + ".bias"] = sd[q + ours + ".bias"]
        out["transformer.ln_f.weight"], out["transformer.ln_f.bias"] = sd["norm.weight"], sd["norm.bias"]
    else:
        hs = c.head_size
        out["model.embed_tokens.weight"] = sd["tok_embeddings.weight"][:V]
        for i in range(c.n_layer):
            p, q = f"model.layers.{i}.", f"layers.{i}."
            out[p + "input_layernorm.weight"] = sd[q + "attention_norm.weight"]
            out[p + "post_attention_layernorm.weight"] = sd[q + "ffn_norm.weight"]
            wq, wk, wv = sd[q + "attention.qkv.weight"].split([c.n_head * hs, c.kv_heads * hs, c.kv_heads * hs])
            out[p + "self_attn.q_proj.weight"], out[p + "self_attn.k_proj.weight"], out[p + "self_attn.v_proj.weight"] = wq, wk, wv
            out[p + "self_attn.o_proj.weight"] = sd[q + "attention.proj.weight"]
            gate, up = sd[q + "feed_forward.fc.weight"].chunk(2)
            out[p + "mlp.gate_proj.weight"], out[p + "mlp.up_proj.weight"] = gate, up
            out[p + "mlp.down_proj.weight"] = sd[q + "feed_forward.proj.weight"]
        out["model.norm.weight"] = sd["norm.weight"]
    if not c.tie_embeddings:
        out["lm_head.weight"] = sd["output.weight"][:V]
    return {k: v.detach().contiguous() for k, v in out.items()}


def _getter(tensors: Tensors, read: set[str] | None = None) -> Callable[..., torch.Tensor]:
    def get(name: str, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """Tensor `name`; one that is fused with others is checked first to have `shape`."""
        if name not in tensors:
            raise UserError(f"weight {name!r} is missing from the checkpoint; it does not match its config.json")
        if read is not None:
            read.add(name)
        return tensors[name] if shape is None else check_shape(tensors[name], name, shape, "config.json")

    return get


# ------------------------------------------------------------------------------------ directories
def import_hf(src: str | Path, out: str | Path) -> Path:
    """Convert a Hugging Face model directory (config.json, *.safetensors, tokenizer.json) to a checkpoint."""
    src = Path(src)
    if src.exists() and not src.is_dir():
        hint = "; for a .gguf file use `lmforge import gguf`" if src.suffix == ".gguf" else ""
        raise UserError(f"{src} is not a directory; pass a Hugging Face model directory{hint}")
    check_checkpoint_out(out, src)  # before the work: never over the model being imported, a run, or another kind
    config = config_from_hf(read_json(src / "config.json", _HF_FIX), src / "config.json")
    generation = _generation_config(src, _HF_FIX)
    tensors = _read_safetensors(src)
    model = Transformer(config)
    used: set[str] = set()
    try:
        sd = state_dict_from_hf(config, tensors, used)
    except UserError as e:
        raise UserError(f"{src}: {e}") from None
    unused = set(tensors) - used
    if unused:
        raise UserError(
            f"{src}: {len(unused)} of the weights' tensors are not part of the model its config.json describes "
            f"({some_names(unused)}); the config and the weights disagree "
            "(is its layer count right?)"
        )
    for name, shape in ((k, v.shape) for k, v in model.state_dict().items()):
        if name in sd and sd[name].shape != shape:
            raise UserError(
                f"{src}: tensor for {name} has shape {tuple(sd[name].shape)} but config.json implies {tuple(shape)}; "
                "the config and the weights disagree"
            )
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [m for m in missing if m not in ("output.weight", "mlm.decoder.weight")]  # a tied head is the embedding
    fresh = [h for h in _BERT_HEADS if any(m.startswith(h + ".") for m in missing)] if config.arch == "encoder" else []
    missing = [m for m in missing if m.split(".")[0] not in fresh]
    if missing or unexpected:
        raise UserError(f"{src}: weights do not match the architecture (missing {missing[:3]}, unexpected {unexpected[:3]})")
    tokenizer = Tokenizer.load(src, fix=f"the tokenizer is part of the model: re-download {src} with its tokenizer.json "
                                        "(a newly trained tokenizer would not match the weights)")
    # Checked as every checkpoint load checks it: the checkpoint written would not load.
    check_tokenizer_fits(tokenizer, src / "tokenizer.json", config, src / "config.json",
                         f"the tokenizer is not the model's: re-download {src} with its own tokenizer.json")
    path = save_checkpoint(out, model, tokenizer, extra=None if generation is None else
                           lambda tmp: atomic_write_json(tmp / GENERATION_FILE, generation))
    if fresh:  # as transformers warns of "newly initialized" weights
        print(f"lmforge: {src} has no weights for BERT's {', '.join(_BERT_HEADS[h] for h in fresh)}; "
              "they are initialised afresh (train them before use)", file=sys.stderr)
    return path


def export_hf(checkpoint: str | Path, out: str | Path) -> Path:
    """Write a checkpoint as a Hugging Face directory that `AutoModelForCausalLM`/`AutoTokenizer` load
    (BERT: `AutoModelForPreTraining`/`AutoModelForMaskedLM`), with the tokenizer's roles and chat template."""
    model, ckpt = load_model(checkpoint)
    # `out` is replaced wholesale: only an earlier export, never the checkpoint itself, its run, another run or
    # another model. A downloaded model's directory has a config.json as an export has, and transformers copies
    # config.json's keys into the models it saves: only the marker file that export alone writes tells an export.
    if _another_model(out_dir(out)):
        raise UserError(f"{out} holds another model (its config.json was not written by `lmforge export hf`), which "
                        "the export would replace with all the files there; pass another --out")
    check_replaceable(out, EXPORT_MARKER, "a model directory", key="exported_by", sources=(ckpt.path, checkpoint))
    generation = _generation_config(ckpt.path, "delete it (only `lmforge export hf` reads it) or import the model again")
    config = ckpt.model_config
    if config.lora is not None:
        raise UserError(f"{ckpt.path} holds LoRA adapters; fold them in with `lmforge merge-lora`, then export the result")
    if config.task_head != "none":
        raise UserError(f"{ckpt.path} has a {config.task_head} head, which HF export does not map; export the base model")
    hf_config = config_to_hf(config, ckpt.tokenizer)
    tensors = state_dict_to_hf(config, model.state_dict())
    out = Path(out)
    with atomic_dir(out) as tmp:
        atomic_write_json(tmp / "config.json", hf_config)
        if generation is not None:
            atomic_write_json(tmp / GENERATION_FILE, generation)
        atomic_write_json(tmp / EXPORT_MARKER, {"exported_by": "lmforge"})
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        usual_mode(tmp / "model.safetensors")  # safetensors 0.8 writes 0600
        tok, bert = ckpt.tokenizer, hf_config["model_type"] == "bert"
        roles: dict[str, Any] = tok.roles()
        atomic_write_text(tmp / "tokenizer.json", _hf_tokenizer(tok, bert).to_str(pretty=True))
        if bert:  # a pair's segments, as lmforge's encoder reads them
            roles["model_input_names"] = ["input_ids", "token_type_ids", "attention_mask"]
        atomic_write_json(tmp / "tokenizer_config.json", {
            "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": config.context_length, **roles,
        })
    return out


def _another_model(out: Path) -> bool:
    """Whether `out` holds a Hugging Face model that no export wrote (one downloaded, or saved by transformers)."""
    if (out / EXPORT_MARKER).is_file() or not (out / "config.json").is_file():
        return False
    try:
        return is_hf_config(read_json(out / "config.json", ""))
    except UserError:  # an unreadable config.json: no export's either, which check_replaceable refuses
        return False


def _generation_config(directory: Path, fix: str) -> dict[str, Any] | None:
    """The generation_config.json in `directory`, or None where there is none: the defaults of transformers'
    `generate`, which import keeps in the checkpoint and export writes back. Of them lmforge reads only the
    end ids (`eos_token_id`, which `Tokenizer.load` takes). Read as JSON data, never run; `fix` ends the
    error of a damaged one."""
    path = directory / GENERATION_FILE
    return read_json_object(path, "generation settings", fix) if path.exists() else None


def _hf_tokenizer(tok: Tokenizer, encoder: bool) -> tokenizers.Tokenizer:
    """The tokenizer.json to export: for an encoder, one that frames a text as lmforge's encoder inputs
    are framed (`[CLS] A [SEP]`, a pair `[CLS] A [SEP] B [SEP]` with token types 0 and 1: BERT's rule),
    where the tokenizer has no framing of its own. lmforge's `encode` adds no tokens either way."""
    hf = tokenizers.Tokenizer.from_str(tok.hf.to_str())
    if encoder and hf.post_processor is None and tok.cls_id is not None and tok.sep_id is not None:
        cls, sep = tok.hf.id_to_token(tok.cls_id), tok.hf.id_to_token(tok.sep_id)
        hf.post_processor = processors.TemplateProcessing(
            single=[cls, "$A", sep], pair=[cls, "$A", sep, "$B:1", f"{sep}:1"],
            special_tokens=[(cls, tok.cls_id), (sep, tok.sep_id)],
        )
    return hf


def _read_safetensors(src: Path) -> Tensors:
    index = src / "model.safetensors.index.json"
    files = ["model.safetensors"]
    if index.exists():
        listing = read_json(index, _HF_FIX)
        weight_map = read_key(listing if isinstance(listing, dict) else {}, "weight_map", dict, index, _HF_FIX)
        files = sorted({read_key(weight_map, k, str, index, _HF_FIX, prefix="weight_map.") for k in weight_map})
        for name in files:  # shards lie in the model's folder: a path (../x, /etc/x) would read a file from elsewhere
            if Path(name).name != name or name in ("", ".", ".."):
                raise UserError(f"{index}: weight_map names the shard {name!r}, not a file in {src}; {_HF_FIX}")
    tensors: Tensors = {}
    for name in files:
        path = src / name
        if not path.exists():
            shards = {p.name for p in src.glob("model-*.safetensors")}
            if shards and not index.exists():
                raise UserError(f"{index} is missing: the weights are in shards ({some_names(shards, 2)}) and it lists "
                                f"which tensor each holds; {_HF_FIX}")
            bins = list(src.glob("*.bin"))
            hint = " (only PyTorch .bin files found: convert them to safetensors first)" if bins else ""
            raise UserError(f"{path} is missing{hint}; lmforge reads weights from safetensors only")
        if path.is_dir():
            raise UserError(f"{path} is a folder, not a safetensors file; {_HF_FIX}")
        try:
            tensors.update(load_file(str(path)))
        except (SafetensorError, OSError) as e:
            raise UserError(f"{path} is truncated or corrupt ({str(e).splitlines()[0]}); re-download it") from None
    return tensors
