"""Faithfulness against `transformers`: random-weight GPT-2 and Llama models built from small configs."""

import json
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lmforge.checkpoint import load_model  # noqa: E402
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
