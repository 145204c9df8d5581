"""Faithfulness against `transformers`: random-weight GPT-2 and Llama models built from small configs."""

import json
import re
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lmforge.checkpoint import load_checkpoint, load_model  # noqa: E402
from lmforge.interop import export_hf, import_hf  # noqa: E402
from lmforge.utils.errors import UserError  # noqa: E402

VOCAB = 512  # the session tokenizer's size


def gpt2(tie=True):
    cfg = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=128, vocab_size=VOCAB, tie_word_embeddings=tie)
    return transformers.GPT2LMHeadModel(cfg)


def llama(rope=None, tie=False, kv=2):
    cfg = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=kv,
        max_position_embeddings=128, vocab_size=VOCAB, rms_norm_eps=1e-5, tie_word_embeddings=tie,
        rope_scaling=rope, rope_theta=50000.0,
    )
    return transformers.LlamaForCausalLM(cfg)


LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 32}

MODELS = {
    "gpt2": lambda: gpt2(),
    "gpt2-untied": lambda: gpt2(tie=False),
    "llama-gqa-llama3-rope": lambda: llama(rope=LLAMA3),
    "llama-mqa-linear-rope-tied": lambda: llama(rope={"rope_type": "linear", "factor": 4.0}, tie=True, kv=1),
    "llama-mha": lambda: llama(kv=4),
}


def hf_dir(tmp_path, model, tokenizer_dir):
    torch.manual_seed(0)
    for p in model.parameters():  # random biases and norm weights too, so every tensor is checked
        torch.nn.init.normal_(p, std=0.1)
    path = tmp_path / "hf"
    model.save_pretrained(path, safe_serialization=True)
    shutil.copyfile(tokenizer_dir / "tokenizer.json", path / "tokenizer.json")
    return path


@pytest.mark.parametrize("name", list(MODELS))
def test_import_then_export_matches_transformers(name, tmp_path, tokenizer_dir):
    hf_model = MODELS[name]().eval()
    src = hf_dir(tmp_path, hf_model, tokenizer_dir)
    idx = torch.randint(0, VOCAB, (2, 100))  # long enough for the RoPE scalings to matter
    with torch.no_grad():
        reference = hf_model(idx).logits

    ckpt = import_hf(src, tmp_path / "ckpt")
    ours, _ = load_model(ckpt)
    with torch.no_grad():
        logits = ours(idx)[..., :VOCAB]
    assert (logits - reference).abs().max().item() < 1e-4

    out = export_hf(ckpt, tmp_path / "export")
    back, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    with torch.no_grad():
        again = back.eval()(idx).logits
    assert (again - logits).abs().max().item() < 1e-4


def bert(tie=True):
    cfg = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
        max_position_embeddings=128, type_vocab_size=2, tie_word_embeddings=tie,
    )
    return transformers.BertForPreTraining(cfg)


@pytest.mark.parametrize("tie", [True, False])
def test_bert_mlm_and_nsp_match_transformers_with_padding_and_segments(tie, tmp_path, tokenizer_dir):
    hf_model = bert(tie).eval()
    src = hf_dir(tmp_path, hf_model, tokenizer_dir)
    idx = torch.randint(0, VOCAB, (3, 50))
    types = (torch.arange(50) >= 20).long().expand(3, 50)
    mask = torch.ones(3, 50, dtype=torch.long)
    mask[1, 35:] = 0  # padded sequences
    mask[2, 10:] = 0
    with torch.no_grad():
        ref = hf_model(idx, attention_mask=mask, token_type_ids=types)

    ckpt = import_hf(src, tmp_path / "ckpt")
    ours, _ = load_model(ckpt)
    with torch.no_grad():
        hidden = ours.encode(idx, attention_mask=mask, token_type_ids=types)
        mlm = ours.mlm(hidden)[..., :VOCAB]
        nsp = ours.nsp_logits(hidden)
    assert (mlm - ref.prediction_logits).abs().max().item() < 1e-4
    assert (nsp - ref.seq_relationship_logits).abs().max().item() < 1e-4

    back, info = transformers.AutoModelForPreTraining.from_pretrained(export_hf(ckpt, tmp_path / "export"), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    with torch.no_grad():
        again = back.eval()(idx, attention_mask=mask, token_type_ids=types)
    assert (again.prediction_logits - mlm).abs().max().item() < 1e-4
    assert (again.seq_relationship_logits - nsp).abs().max().item() < 1e-4


def test_exported_tokenizer_loads_in_transformers(tmp_path, tokenizer_dir, trained_run):
    out = export_hf(trained_run.out, tmp_path / "export")
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    _, ckpt = load_model(trained_run.out)
    text = "ROMEO: O, she doth teach the torches to burn bright! 日本 😀"
    assert hf_tok(text)["input_ids"] == ckpt.tokenizer.encode(text)
    assert hf_tok.eos_token == "<|endoftext|>"


def test_unsupported_model_type(tmp_path, tokenizer_dir):
    src = hf_dir(tmp_path, gpt2(), tokenizer_dir)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "model_type": "mamba"}))
    with pytest.raises(UserError, match="model_type 'mamba' is not supported"):
        import_hf(src, tmp_path / "ckpt")


def test_config_that_disagrees_with_tensors(tmp_path, tokenizer_dir):
    src = hf_dir(tmp_path, llama(), tokenizer_dir)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 128}))
    with pytest.raises(UserError, match="config and the weights disagree"):
        import_hf(src, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


def test_truncated_weights(tmp_path, tokenizer_dir):
    src = hf_dir(tmp_path, gpt2(), tokenizer_dir)
    data = (src / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(data[: len(data) // 3])
    with pytest.raises(UserError, match="truncated or corrupt"):
        import_hf(src, tmp_path / "ckpt")


def test_architecture_without_hf_equivalent(tmp_path, trained_run):
    import lmforge.checkpoint.store as store  # re-save the tiny run with sinusoidal positions

    model, ckpt = load_model(trained_run.out)
    from lmforge.model import Transformer

    sin = Transformer(ckpt.model_config.replace(position="sinusoidal"))
    path = store.save_checkpoint(tmp_path / "sin", sin, ckpt.tokenizer)
    with pytest.raises(UserError, match="no Hugging Face equivalent"):
        export_hf(path, tmp_path / "export")
    assert not (tmp_path / "export").exists()


# ------------------------------------------------------------------------- what HF cannot hold
from lmforge.config import ModelConfig, preset  # noqa: E402
from lmforge.interop.hf import config_from_hf, config_to_hf, state_dict_to_hf  # noqa: E402
from lmforge.model import Transformer  # noqa: E402

GPT2_SHAPE = dict(vocab_size=VOCAB, context_length=128, n_layer=2, n_head=4, n_embd=64)
LLAMA_SHAPE = dict(GPT2_SHAPE, position="rotary", norm="rmsnorm", mlp="swiglu", bias=False, n_kv_head=2)
BERT_SHAPE = dict(GPT2_SHAPE, arch="encoder", norm_position="post", embed_norm=True, type_vocab_size=2)


@pytest.mark.parametrize("shape,extra", [
    (GPT2_SHAPE, {"embed_scale": True}), (GPT2_SHAPE, {"embed_norm": True}), (GPT2_SHAPE, {"type_vocab_size": 2}),
    (LLAMA_SHAPE, {"embed_scale": True}), (LLAMA_SHAPE, {"embed_norm": True}), (LLAMA_SHAPE, {"type_vocab_size": 2}),
    (BERT_SHAPE, {"embed_scale": True}),
])
def test_export_refuses_embedding_settings_transformers_lacks(shape, extra):
    """transformers' GPT-2 and Llama have no embedding scale, embedding norm or token types, and BERT no
    embedding scale: writing such a model anyway gave logits off by 3.6-6.3."""
    plain = ModelConfig(**shape)
    assert config_to_hf(plain)["vocab_size"] == VOCAB  # the shape itself is exportable
    config = ModelConfig(**shape, **extra)
    with pytest.raises(UserError, match=f"{next(iter(extra))}=.*has no Hugging Face equivalent"):
        config_to_hf(config)
    with pytest.raises(UserError, match="has no Hugging Face equivalent"):
        state_dict_to_hf(config, Transformer(config).state_dict())


# ----------------------------------------------------------------------- weights left unread
def _edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, **changes}))


@pytest.mark.parametrize("name,key,prefix", [
    ("gpt2", "n_layer", "transformer.h.1."), ("llama-mha", "num_hidden_layers", "model.layers.1."),
    ("bert", "num_hidden_layers", "bert.encoder.layer.1."),
])
def test_import_refuses_layers_config_json_does_not_name(name, key, prefix, tmp_path, tokenizer_dir):
    """A config.json naming fewer layers than the weights hold used to import the first layers silently."""
    src = hf_dir(tmp_path, bert() if name == "bert" else MODELS[name](), tokenizer_dir)
    _edit_config(src, **{key: 1})
    with pytest.raises(UserError, match=rf"config\.json.*{prefix.replace('.', '[.]')}") as err:
        import_hf(src, tmp_path / "ckpt")
    assert "\n" not in str(err.value) and str(src) in str(err.value)
    assert not (tmp_path / "ckpt").exists()


def test_import_ignores_known_buffers_and_refuses_other_extra_tensors(tmp_path, tokenizer_dir):
    from safetensors.torch import load_file, save_file

    src = hf_dir(tmp_path, gpt2(), tokenizer_dir)
    tensors = load_file(src / "model.safetensors")
    buffers = {"transformer.h.0.attn.bias": torch.ones(1, 1, 128, 128), "transformer.h.0.attn.masked_bias": torch.tensor(-1e4),
               "lm_head.weight": tensors["transformer.wte.weight"].clone()}
    save_file({**tensors, **buffers}, src / "model.safetensors", metadata={"format": "pt"})
    import_hf(src, tmp_path / "ckpt")  # older transformers saved GPT-2's causal-mask buffers and the tied head: harmless

    save_file({**tensors, "score.weight": torch.zeros(2, 64)}, src / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match="score.weight"):
        import_hf(src, tmp_path / "ckpt2")


# ------------------------------------------------------------------- malformed config.json files
@pytest.mark.parametrize("edit,message", [
    (lambda c: {k: v for k, v in c.items() if k != "num_hidden_layers"}, "'num_hidden_layers' is missing"),
    (lambda c: [1, 2], "must be a JSON object"),
    (lambda c: {**c, "vocab_size": "512"}, "'vocab_size' is '512'.*positive integer"),
    (lambda c: {**c, "rms_norm_eps": True}, "'rms_norm_eps' is True.*number"),
    (lambda c: {**c, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}, "rope_parameters": None},
     "'rope_scaling.low_freq_factor' is missing"),
    (lambda c: {**c, "rope_parameters": {"rope_type": "linear", "rope_theta": 1e4}}, "'rope_parameters.factor' is missing"),
])
def test_malformed_config_json_is_one_line(edit, message, tmp_path, tokenizer_dir):
    src = hf_dir(tmp_path, llama(), tokenizer_dir)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps(edit(cfg)))
    with pytest.raises(UserError, match=message) as err:
        import_hf(src, tmp_path / "ckpt")
    assert "\n" not in str(err.value) and str(src / "config.json") in str(err.value)


def test_import_hf_of_a_file_or_unreadable_config(tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    with pytest.raises(UserError, match="m.gguf is not a directory.*import gguf"):
        import_hf(tmp_path / "m.gguf", tmp_path / "ckpt")
    (tmp_path / "d" / "config.json").mkdir(parents=True)  # read_json on something unreadable
    with pytest.raises(UserError, match="config.json cannot be read"):
        import_hf(tmp_path / "d", tmp_path / "ckpt")


@pytest.mark.parametrize("flag,value", [
    ("scale_attn_by_inverse_layer_idx", True), ("scale_attn_weights", False), ("reorder_and_upcast_attn", True),
])
def test_gpt2_attention_flags_lmforge_does_not_model_are_refused(flag, value):
    """Imported anyway, these gave logits off by 0.02 (inverse layer index) and 1.07 (no 1/sqrt(d) scale)."""
    cfg = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=64, vocab_size=300).to_dict()
    assert config_from_hf(cfg).n_layer == 2
    with pytest.raises(UserError, match=f"{flag}={value}"):
        config_from_hf({**cfg, flag: value})


# ------------------------------------------------------------------- BERT classes other than pretraining
def _bert_class(name, **extra):
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=96, max_position_embeddings=128, **extra)
    return getattr(transformers, name)(cfg)


@pytest.mark.parametrize("name,fresh,head", [
    ("BertForMaskedLM", "pooler, next-sentence head", None),
    ("BertModel", "masked-LM head, next-sentence head", None),
    ("BertForSequenceClassification", "masked-LM head, next-sentence head", "classify"),
    ("BertForTokenClassification", "pooler, masked-LM head, next-sentence head", "tag"),
    ("BertForQuestionAnswering", "pooler, masked-LM head, next-sentence head", "span"),
])
def test_bert_classes_import_with_absent_heads_initialised_afresh(name, fresh, head, tmp_path, tokenizer_dir, capsys):
    """Only BertForPreTraining imported: the others failed on a weight they do not have, in a message
    that named no directory. As transformers does, the heads a class lacks start from fresh weights
    (said in one line); a task class's own head becomes lmforge's task head, its labels kept."""
    labels = {"id2label": {0: "neg", 1: "pos", 2: "neutral"}} if head == "classify" else {}
    hf_model = _bert_class(name, **labels).eval()
    src = hf_dir(tmp_path, hf_model, tokenizer_dir)
    idx, mask = torch.randint(0, VOCAB, (2, 40)), torch.ones(2, 40, dtype=torch.long)
    mask[1, 25:] = 0
    with torch.no_grad():
        ref = hf_model(idx, attention_mask=mask)
    capsys.readouterr()  # transformers' own progress bars
    ckpt = import_hf(src, tmp_path / "ckpt")
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(src) in err and fresh in err and "afresh" in err
    ours, info = load_model(ckpt)
    assert info.model_config.task_head == (head or "none")
    with torch.no_grad():
        hidden = ours.encode(idx, attention_mask=mask)
        if head:
            got = ours.task_logits(idx, attention_mask=mask)
            want = ref.logits if head != "span" else torch.stack([ref.start_logits, ref.end_logits], -1)
        elif name == "BertForMaskedLM":
            got, want = ours.mlm(hidden)[..., :VOCAB], ref.logits
        else:
            got, want = torch.cat([hidden[:, 0], ours.pooler(hidden)]), torch.cat([ref.last_hidden_state[:, 0], ref.pooler_output])
    assert (got - want).abs().max().item() < 1e-4
    if head == "classify":
        assert info.model_config.labels == ["neg", "pos", "neutral"]


@pytest.mark.parametrize("name,extra", [("BertLMHeadModel", {"is_decoder": True}), ("BertForMultipleChoice", {})])
def test_bert_classes_lmforge_cannot_hold_are_refused_in_one_line(name, extra, tmp_path, tokenizer_dir):
    src = hf_dir(tmp_path, _bert_class(name, **extra), tokenizer_dir)
    with pytest.raises(UserError, match=f"{name}.*not supported.*BertForPreTraining") as err:
        import_hf(src, tmp_path / "ckpt")
    assert "\n" not in str(err.value) and str(src) in str(err.value)


def test_a_bert_head_half_present_names_the_directory(tmp_path, tokenizer_dir):
    from safetensors.torch import load_file, save_file

    src = hf_dir(tmp_path, bert(), tokenizer_dir)
    tensors = load_file(src / "model.safetensors")
    del tensors["cls.predictions.transform.dense.bias"]
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match=f"{src}.*cls.predictions.transform.dense.bias.*missing"):
        import_hf(src, tmp_path / "ckpt")


@pytest.mark.parametrize("model,keys", [
    (lambda: gpt2(), ("resid_pdrop", "embd_pdrop", "attn_pdrop")),
    (lambda: llama(), ("attention_dropout",)),
    (lambda: bert(), ("hidden_dropout_prob", "attention_probs_dropout_prob")),
])
def test_dropout_is_carried_both_ways(model, keys, tmp_path, tokenizer_dir):
    """Export wrote every dropout as 0.0 and import read none: a fine-tune of an imported GPT-2 or BERT
    ran without the dropout transformers would apply."""
    src = hf_dir(tmp_path, model(), tokenizer_dir)
    _edit_config(src, **{k: 0.2 for k in keys})
    ckpt = import_hf(src, tmp_path / "ckpt")
    _, info = load_model(ckpt)
    assert info.model_config.dropout == 0.2
    exported = json.loads((export_hf(ckpt, tmp_path / "export") / "config.json").read_text())
    assert all(exported[k] == 0.2 for k in keys)


@pytest.mark.parametrize("model,first,second,rows", [
    (lambda: llama(), "model.layers.1.mlp.gate_proj.weight", "model.layers.1.mlp.up_proj.weight", (64, 128)),
    (lambda: llama(), "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight", (80, 16)),
    (lambda: bert(), "bert.encoder.layer.1.attention.self.query.bias", "bert.encoder.layer.1.attention.self.key.bias", (32, 96)),
])
def test_pieces_of_the_wrong_shape_are_refused_before_they_are_fused(model, first, second, rows, tmp_path, tokenizer_dir):
    """q/k/v and gate/up pieces whose sizes were wrong but added up to the fused shape imported as garbage
    (transformers refuses them)."""
    from safetensors.torch import load_file, save_file

    src = hf_dir(tmp_path, model(), tokenizer_dir)
    tensors = load_file(src / "model.safetensors")
    expected = tuple(tensors[first].shape)
    for name, n in zip((first, second), rows):
        tensors[name] = torch.randn(n, *tensors[name].shape[1:])
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    says = f"{src}: tensor {first} has shape {(rows[0], *expected[1:])} but config.json implies {expected}"
    with pytest.raises(UserError, match=re.escape(says)) as err:
        import_hf(src, tmp_path / "ckpt")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "ckpt").exists()


def test_shards_without_their_index_say_the_index_is_missing(tmp_path, tokenizer_dir):
    """The error said model.safetensors was missing and that lmforge reads safetensors only."""
    src = tmp_path / "hf"
    llama().save_pretrained(src, max_shard_size="100KB")
    shutil.copyfile(tokenizer_dir / "tokenizer.json", src / "tokenizer.json")
    assert len(list(src.glob("model-*-of-*.safetensors"))) > 1
    (src / "model.safetensors.index.json").unlink()
    with pytest.raises(UserError, match=r"model\.safetensors\.index\.json is missing: the weights are in shards "
                                        r"\(model-00001-of-") as err:
        import_hf(src, tmp_path / "ckpt")
    assert "\n" not in str(err.value)



@pytest.mark.parametrize("name", ["../elsewhere.safetensors", "/etc/passwd", "", "."])
def test_an_index_naming_a_shard_outside_the_folder_is_refused(name, tmp_path, tokenizer_dir):
    """Seen in review: `"../elsewhere/w.safetensors"` in the weight_map was read, and the import succeeded."""
    src = tmp_path / "hf"
    llama().save_pretrained(src, max_shard_size="100KB")
    shutil.copyfile(tokenizer_dir / "tokenizer.json", src / "tokenizer.json")
    index = src / "model.safetensors.index.json"
    listing = json.loads(index.read_text())
    last = sorted(set(listing["weight_map"].values()))[-1]
    shutil.move(src / last, tmp_path / "elsewhere.safetensors")
    listing["weight_map"] = {k: (name if v == last else v) for k, v in listing["weight_map"].items()}
    index.write_text(json.dumps(listing))
    with pytest.raises(UserError, match=re.escape(f"{index}: weight_map names the shard {name!r}, not a file in {src}")):
        import_hf(src, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


def test_generation_config_is_carried_both_ways(tmp_path, tokenizer_dir):
    """Import and export dropped generation_config.json: transformers' `generate` on an export lost the
    model's sampling settings and its second stop id."""
    src = hf_dir(tmp_path, llama(), tokenizer_dir)
    transformers.GenerationConfig(do_sample=True, temperature=0.6, top_p=0.9, bos_token_id=1,
                                  eos_token_id=[2, 0]).save_pretrained(src)
    ckpt = import_hf(src, tmp_path / "ckpt")
    assert json.loads((ckpt / "generation_config.json").read_text()) == json.loads((src / "generation_config.json").read_text())
    tok = load_checkpoint(ckpt).tokenizer  # generation stops at each of its end ids (see tests/infer/test_end_ids.py)
    assert tok.end_ids == tuple(dict.fromkeys((tok.eot_id, 2, 0)))
    out = export_hf(ckpt, tmp_path / "export")
    back = transformers.AutoModelForCausalLM.from_pretrained(out).generation_config
    assert back.to_diff_dict() == transformers.GenerationConfig.from_pretrained(src).to_diff_dict()
    assert (back.do_sample, back.temperature, back.eos_token_id) == (True, 0.6, [2, 0])


@pytest.mark.parametrize("text,message", [("[1, 2]", "is not a JSON object of generation settings"),
                                          ("{not json", "is corrupt")])
def test_a_damaged_generation_config_is_one_line_and_writes_nothing(text, message, tmp_path, tokenizer_dir):
    src = hf_dir(tmp_path, llama(), tokenizer_dir)
    (src / "generation_config.json").write_text(text)
    with pytest.raises(UserError, match=f"generation_config.json {message}") as err:
        import_hf(src, tmp_path / "ckpt")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "ckpt").exists()


def test_export_refuses_a_tokenizer_larger_than_the_models_vocabulary(tmp_path, tokenizer_dir):
    """Seen in review: export wrote the mismatched pair, whose transformers model fails on the extra ids."""
    from lmforge.checkpoint import save_checkpoint
    from lmforge.config import preset
    from lmforge.model import Transformer
    from lmforge.tokenizer import Tokenizer

    ckpt = save_checkpoint(tmp_path / "ckpt", Transformer(preset("tiny", vocab_size=300)), Tokenizer.load(tokenizer_dir))
    with pytest.raises(UserError, match=r"tokenizer.json has 512 tokens but the model's vocab_size is 300"):
        export_hf(ckpt, tmp_path / "export")
    assert not (tmp_path / "export").exists()


def test_import_refuses_a_tokenizer_larger_than_the_models_vocabulary(tmp_path, tokenizer_dir):
    """Else it writes a checkpoint that nothing can load."""
    src = hf_dir(tmp_path, llama(), tokenizer_dir)
    _edit_config(src, vocab_size=300)
    from safetensors.torch import load_file, save_file

    tensors = {k: v[:300] if v.shape[0] == VOCAB else v for k, v in load_file(src / "model.safetensors").items()}
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"hf/tokenizer.json has 512 tokens but the model's vocab_size is 300 "
                                        r"\(.*hf/config.json\)"):
        import_hf(src, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


def test_export_ignores_a_damaged_trainer_state_and_writes_readable_weights(tmp_path, trained_run):
    """Seen in review: a damaged trainer_state.json (which export never needs) blocked the export, and
    model.safetensors came out mode 0600 (safetensors 0.8's temporary file), unreadable to other accounts."""
    import os
    import stat

    ckpt = tmp_path / "ckpt"
    shutil.copytree(trained_run.checkpoint, ckpt)
    (ckpt / "trainer_state.json").write_text("{not json")
    old = os.umask(0o022)
    try:
        out = export_hf(ckpt, tmp_path / "export")
    finally:
        os.umask(old)
    assert stat.S_IMODE((out / "model.safetensors").stat().st_mode) == 0o644


# ------------------------------------------------------------------ defaults and padded vocabularies
def test_a_llama_config_json_without_optional_keys_takes_transformers_defaults(tmp_path, tokenizer_dir):
    """LlamaConfig's defaults: untied embeddings and rope_theta 10000. Reading a missing
    tie_word_embeddings as tied would replace lm_head by the embedding, silently."""
    hf_model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=128, vocab_size=VOCAB, rms_norm_eps=1e-5, tie_word_embeddings=False)).eval()
    src = hf_dir(tmp_path, hf_model, tokenizer_dir)
    cfg = json.loads((src / "config.json").read_text())
    assert cfg.pop("tie_word_embeddings") is False
    cfg.pop("rope_theta", None)
    assert cfg.pop("rope_parameters", {"rope_theta": 10000.0}).get("rope_theta", 10000.0) == 10000.0
    (src / "config.json").write_text(json.dumps(cfg))
    idx = torch.randint(0, VOCAB, (2, 100))
    with torch.no_grad():
        reference = hf_model(idx).logits
        ours = load_model(import_hf(src, tmp_path / "ckpt"))[0](idx)[..., :VOCAB]
    assert (ours - reference).abs().max().item() < 1e-4


@pytest.mark.parametrize("shape", [GPT2_SHAPE, LLAMA_SHAPE], ids=["gpt2", "llama"])
@pytest.mark.parametrize("tie", [True, False])
def test_export_of_a_padded_vocabulary_writes_the_real_rows_only(shape, tie, tmp_path, tokenizer_dir):
    """lmforge pads embedding rows for speed; transformers' vocab_size is the tokenizer's, and a
    model with more rows than that does not load (or loads rows no token has)."""
    import lmforge.checkpoint.store as store
    from lmforge.tokenizer import Tokenizer

    torch.manual_seed(0)
    config = ModelConfig(**{**shape, "pad_vocab_multiple": 384, "tie_embeddings": tie})
    assert config.padded_vocab_size == 768
    model = Transformer(config).eval()
    path = store.save_checkpoint(tmp_path / "ckpt", model, Tokenizer.load(tokenizer_dir))
    back, info = transformers.AutoModelForCausalLM.from_pretrained(export_hf(path, tmp_path / "export"), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    idx = torch.randint(0, VOCAB, (2, 50))
    with torch.no_grad():
        assert (back.eval()(idx).logits - model(idx)[..., :VOCAB]).abs().max().item() < 1e-4


# ---------------------------------------------------------------- presets against the released shapes
# The shapes of the released config.json files (gpt2, gpt2-medium/large/xl, Llama-2-7b, Meta-Llama-3-8B,
# Llama-3.2-1B, SmolLM2-135M, bert-base-uncased) as released on the Hugging Face Hub.
GPT2 = lambda L, H, C: {"model_type": "gpt2", "n_ctx": 1024, "n_positions": 1024, "n_embd": C, "n_head": H, "n_layer": L,
                        "vocab_size": 50257, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5}
LLAMA = dict(model_type="llama", rms_norm_eps=1e-5, hidden_act="silu")
PUBLISHED = {
    "gpt2-124m": GPT2(12, 12, 768), "gpt2-350m": GPT2(24, 16, 1024), "gpt2-774m": GPT2(36, 20, 1280), "gpt2-1.5b": GPT2(48, 25, 1600),
    "llama-2-7b": dict(LLAMA, hidden_size=4096, intermediate_size=11008, max_position_embeddings=4096, num_attention_heads=32,
                       num_hidden_layers=32, num_key_value_heads=32, rope_theta=10000.0, tie_word_embeddings=False, vocab_size=32000),
    "llama-3-8b": dict(LLAMA, hidden_size=4096, intermediate_size=14336, max_position_embeddings=8192, num_attention_heads=32,
                       num_hidden_layers=32, num_key_value_heads=8, rope_theta=500000.0, tie_word_embeddings=False, vocab_size=128256),
    "llama-3.2-1b": dict(LLAMA, hidden_size=2048, intermediate_size=8192, max_position_embeddings=131072, num_attention_heads=32,
                         num_hidden_layers=16, num_key_value_heads=8, rope_theta=500000.0, tie_word_embeddings=True, vocab_size=128256,
                         rope_scaling={"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                       "original_max_position_embeddings": 8192, "rope_type": "llama3"}),
    "smollm2-135m": dict(LLAMA, hidden_size=576, intermediate_size=1536, max_position_embeddings=8192, num_attention_heads=9,
                         num_hidden_layers=30, num_key_value_heads=3, rope_theta=100000.0, tie_word_embeddings=True, vocab_size=49152),
    "bert-base": {"model_type": "bert", "architectures": ["BertForPreTraining"], "hidden_size": 768, "intermediate_size": 3072,
                  "max_position_embeddings": 512, "num_attention_heads": 12, "num_hidden_layers": 12, "type_vocab_size": 2,
                  "layer_norm_eps": 1e-12, "hidden_act": "gelu", "vocab_size": 30522},
}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_presets_have_the_shapes_of_the_released_models(name):
    """A preset that drifts from its model (a head count, the GELU variant, rope theta) would no longer
    load the released weights or match their FLOPs. Dropout (0 for pretraining, as nanoGPT) and the
    vocabulary padding are lmforge's own choices."""
    hf = PUBLISHED[name]
    ours, theirs = preset(name, vocab_size=hf["vocab_size"]), config_from_hf(hf)
    assert ours.kv_heads == theirs.kv_heads
    own = {"preset", "dropout", "pad_vocab_multiple", "n_kv_head"}
    assert {k: v for k, v in ours.to_dict().items() if k not in own} == {k: v for k, v in theirs.to_dict().items() if k not in own}
