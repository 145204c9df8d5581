"""The tokenizer across Hugging Face import and export: special-token roles, chat templates, BERT's
WordPiece vocabulary and [CLS] ... [SEP] framing, checked against `transformers` itself."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lmforge.checkpoint import load_checkpoint, load_model, save_checkpoint  # noqa: E402
from lmforge.config import ModelConfig  # noqa: E402
from lmforge.interop import export_hf, import_hf  # noqa: E402
from lmforge.model import Transformer  # noqa: E402
from lmforge.tokenizer import Tokenizer  # noqa: E402

SHAPE = dict(vocab_size=512, context_length=64, n_layer=1, n_head=2, n_embd=32, pad_vocab_multiple=1)
LLAMA = dict(SHAPE, position="rotary", norm="rmsnorm", mlp="swiglu", bias=False)
BERT = dict(SHAPE, arch="encoder", norm_position="post", embed_norm=True, type_vocab_size=2)
CHAT = ("{% for m in messages %}<|cls|>{{ m['role'] }}\n{{ m['content'] }}<|sep|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|cls|>assistant\n{% endif %}")
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who art thou?"}]


def test_export_keeps_bos_eos_pad_and_the_chat_template(tmp_path, tokenizer_dir):
    """Export wrote EOS as BOS and dropped the chat template: transformers' apply_chat_template failed."""
    base = Tokenizer.load(tokenizer_dir)
    tok = Tokenizer(base.hf, eos_token="<|sep|>", bos_token="<|cls|>", chat_template=CHAT)  # ChatML-like roles
    ckpt = save_checkpoint(tmp_path / "ckpt", Transformer(ModelConfig(**LLAMA)), tok)
    out = export_hf(ckpt, tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (3, 4, 1)
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert (hf_tok.bos_token, hf_tok.eos_token, hf_tok.pad_token) == ("<|cls|>", "<|sep|>", "<|pad|>")
    assert hf_tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True) == tok.apply_chat_template(MESSAGES)

    back = load_checkpoint(import_hf(out, tmp_path / "back")).tokenizer
    assert (back.bos_id, back.eot_id, back.pad_id, back.chat_template) == (3, 4, 1, CHAT)


def test_import_reads_the_chat_template_transformers_saves_beside_the_config(tmp_path, tokenizer_dir):
    """transformers 5 writes the template to chat_template.jinja, not tokenizer_config.json; import lost it."""
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2, vocab_size=512,
        max_position_embeddings=64))
    src = tmp_path / "hf"
    model.save_pretrained(src)
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_dir / "tokenizer.json"), eos_token="<|endoftext|>")
    hf_tok.chat_template = CHAT
    hf_tok.save_pretrained(src)
    assert (src / "chat_template.jinja").exists() and "chat_template" not in json.loads((src / "tokenizer_config.json").read_text())
    tok = load_checkpoint(import_hf(src, tmp_path / "ckpt")).tokenizer
    assert tok.chat_template == CHAT
    assert tok.apply_chat_template(MESSAGES) == hf_tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)


def _bert_wordpiece_dir(path, words):
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words, *(f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz"),
             *"abcdefghijklmnopqrstuvwxyz.,;:!?'"]
    path.mkdir()
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    hf_tok = transformers.BertTokenizerFast(vocab_file=str(path / "vocab.txt"))
    model = transformers.BertForPreTraining(transformers.BertConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48,
        max_position_embeddings=64)).eval()
    model.save_pretrained(path)
    hf_tok.save_pretrained(path)
    return model, hf_tok


def test_a_bert_directory_with_its_wordpiece_tokenizer_imports(tmp_path):
    """A real BERT directory was refused for want of an end-of-text token, and [CLS]/[SEP]/[MASK]/[PAD]
    were looked for under lmforge's names only."""
    model, hf_tok = _bert_wordpiece_dir(tmp_path / "hf", ["the", "king", "queen", "to", "be", "or", "not"])
    ckpt = import_hf(tmp_path / "hf", tmp_path / "ckpt")
    ours, info = load_model(ckpt)
    tok = info.tokenizer
    assert (tok.pad_id, tok.cls_id, tok.sep_id, tok.mask_id, tok.eot_id) == (0, 2, 3, 4, 3)
    text = "To be, or not to be: the Queen!"
    framed = hf_tok(text).input_ids
    assert framed == [tok.cls_id, *tok.encode(text), tok.sep_id]
    idx = torch.tensor([framed])
    with torch.no_grad():
        reference = model(idx).prediction_logits
        assert (ours(idx)[..., : reference.size(-1)] - reference).abs().max().item() < 1e-4


def test_exported_bert_tokenizer_frames_and_fills_masks_as_lmforge_does(tmp_path, tokenizer_dir):
    """The exported tokenizer lacked the mask/cls/sep roles and the [CLS] A [SEP] B [SEP] framing
    lmforge's encoder inputs have: transformers' fill-mask pipeline could not run."""
    tok = Tokenizer.load(tokenizer_dir)
    torch.manual_seed(0)
    ours = Transformer(ModelConfig(**BERT)).eval()
    out = export_hf(save_checkpoint(tmp_path / "ckpt", ours, tok), tmp_path / "hf")
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert (hf_tok.mask_token, hf_tok.cls_token, hf_tok.sep_token, hf_tok.pad_token) == ("<|mask|>", "<|cls|>", "<|sep|>", "<|pad|>")
    a, b = tok.encode("to be or not"), tok.encode(" to be")
    pair = hf_tok("to be or not", " to be")
    assert pair.input_ids == [tok.cls_id, *a, tok.sep_id, *b, tok.sep_id]
    assert pair.token_type_ids == [0] * (len(a) + 2) + [1] * (len(b) + 1)

    fill = transformers.pipeline("fill-mask", model=str(out), tokenizer=hf_tok)
    best = fill("to be or not to<|mask|>", top_k=1)[0]
    ids = torch.tensor([[tok.cls_id, *tok.encode("to be or not to"), tok.mask_id, tok.sep_id]])
    with torch.no_grad():
        logits = ours(ids)[0, -2, : tok.vocab_size]
    assert best["token"] == logits.argmax().item()
    assert abs(best["score"] - logits.softmax(-1).max().item()) < 1e-4


def test_export_declares_no_bos_for_a_tokenizer_without_one(tmp_path, tokenizer_dir):
    """Export declared EOS as the BOS of an lmforge tokenizer, which has none: a round trip gave it a BOS,
    which a chat template's {{ bos_token }} then wrote. config.json keeps GPT-2's bos_token_id = EOS."""
    tok = Tokenizer.load(tokenizer_dir)
    assert tok.bos_id is None
    out = export_hf(save_checkpoint(tmp_path / "ckpt", Transformer(ModelConfig(**LLAMA)), tok), tmp_path / "hf")
    assert "bos_token" not in json.loads((out / "tokenizer_config.json").read_text())
    assert json.loads((out / "config.json").read_text())["bos_token_id"] == tok.eot_id
    assert transformers.AutoTokenizer.from_pretrained(out).bos_token is None
    back = load_checkpoint(import_hf(out, tmp_path / "back")).tokenizer
    assert back.bos_id is None and back.roles() == tok.roles()


def test_export_keeps_the_unknown_token(tmp_path):
    """transformers loaded an exported BERT tokenizer with unk_token None where the original has [UNK]."""
    _, hf_tok = _bert_wordpiece_dir(tmp_path / "hf", ["the", "king"])
    out = export_hf(import_hf(tmp_path / "hf", tmp_path / "ckpt"), tmp_path / "export")
    back = transformers.AutoTokenizer.from_pretrained(out)
    assert (back.unk_token, back.unk_token_id) == (hf_tok.unk_token, hf_tok.unk_token_id) == ("[UNK]", 1)
