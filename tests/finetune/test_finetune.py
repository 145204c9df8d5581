"""Every fine-tuning task end to end on tiny models and slices of the real task data."""

import gzip
import json
import math
import shutil

import pytest
import torch

from conftest import SHARED_DATA, tiny_train_config
from lmforge.checkpoint import load_model, save_checkpoint
from lmforge.config import FINETUNE_DEFAULTS, LoraConfig, preset
from lmforge.evaluate import evaluate_lm, evaluate_task
from lmforge.evaluate.metrics import accuracy, entity_f1, macro_f1
from lmforge.finetune import finetune, merge_lora
from lmforge.infer import load, pipeline, predict
from lmforge.infer.engine import Engine
from lmforge.infer.pipeline import _valid_iob2
from lmforge.model import Transformer
from lmforge.tokenizer import Tokenizer
from lmforge.utils.errors import UserError

YELP = SHARED_DATA / "classification" / "uci-sentiment" / "yelp_labelled.txt"
WNUT = SHARED_DATA / "ner" / "wnut17" / "wnut17train.conll"
SQUAD = SHARED_DATA / "qa" / "squad-v1.1-dev" / "dev-v1.1.json"
MULTI30K = SHARED_DATA / "translation" / "multi30k-en-de"
SCITLDR = SHARED_DATA / "summarization" / "scitldr" / "dev.jsonl"
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QUIET = dict(progress=False, log=lambda *a: None)


def _cfg(**overrides):
    return tiny_train_config(**{"max_steps": 40, "eval_interval": 0, "ckpt_interval": 0, "lr": 3e-3, "min_lr": 0.0,
                                "warmup_steps": 4, "seq_len": 64, "batch_size": 16, **overrides})


def _base(tmp_path_factory, tokenizer_dir, name, **model):
    torch.manual_seed(0)
    tok = Tokenizer.load(tokenizer_dir)
    net = Transformer(preset("tiny").replace(vocab_size=tok.vocab_size, **model))
    return save_checkpoint(tmp_path_factory.mktemp(name) / "ckpt", net, tok)


@pytest.fixture(scope="module")
def encoder(tmp_path_factory, tokenizer_dir):
    return _base(tmp_path_factory, tokenizer_dir, "bert", arch="encoder", type_vocab_size=2, norm_position="post", embed_norm=True)


@pytest.fixture(scope="module")
def yelp_run(trained_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("ft") / "yelp"
    return finetune(trained_run.out, "classify", YELP, out, train=_cfg(max_steps=150), **QUIET)


def test_classify_learns_and_eval_scores_what_the_pipeline_predicts(yelp_run):
    result = evaluate_task(yelp_run.checkpoint, "classify", YELP, device="cpu")
    lines = [line.rsplit("\t", 1) for line in YELP.read_text().splitlines()]
    preds = [p["label"] for p in pipeline("classify", yelp_run.checkpoint, device="cpu")([t for t, _ in lines])]
    assert result["accuracy"] == pytest.approx(accuracy(preds, [g.strip() for _, g in lines]))
    assert result["accuracy"] >= 70.0  # the 1,000 training sentences, after 150 steps from a Shakespeare LM
    assert result["examples"] == 1000 and 0 <= result["macro_f1"] <= 100



def test_the_pipeline_refuses_an_input_of_the_wrong_shape_or_with_a_lone_surrogate(yelp_run):
    """Seen in review: both reached the tokenizer, which raised a bare TypeError."""
    pipe = pipeline("classify", yelp_run.checkpoint, device="cpu")
    with pytest.raises(UserError, match=r"^the input is not valid UTF-8 text \(character U\+D83D at character 4\)"):
        pipe("hi \ud83d there")
    with pytest.raises(UserError, match=r"^input 1 is list '\[3\]'; classify takes a text$"):
        pipe(["fine", [3]])
    # A dict was read as its keys (`{"text": ...}` classified the word "text"); None and 5 failed in list().
    for wrong, kind in (({"text": "a gripping film"}, "dict"), (None, "NoneType"), (5, "int")):
        with pytest.raises(UserError, match=f"^a classify pipeline takes a text or a list of them, not {kind}$"):
            pipe(wrong)
    texts = ["a gripping film", "dull"]  # any other iterable is a batch, as in transformers' pipelines
    assert pipe(t for t in texts) == pipe(tuple(texts)) == pipe(__import__("numpy").array(texts)) == pipe(texts)


def test_an_encoder_classifies_from_its_cls_token(encoder, tmp_path):
    data = tmp_path / "yelp-slice.txt"
    data.write_text("".join(YELP.read_text(encoding="utf-8").splitlines(keepends=True)[:300]), encoding="utf-8")
    run = finetune(encoder, "classify", data, tmp_path / "clf", val=data, train=_cfg(max_steps=40, eval_interval=20), **QUIET)
    val = [r["val_loss"] for r in map(json.loads, open(run.out / "metrics.jsonl")) if r["kind"] == "val"]
    assert val[-1] < val[0]
    pipe = pipeline(None, run.checkpoint, device="cpu", batch_size=4)
    texts = [line.rsplit("\t", 1)[0] for line in data.read_text(encoding="utf-8").splitlines()[:6]]
    # By hand: [CLS] text [SEP], BERT's pooler on the [CLS] state (tanh(dense(h[0]))), then the head.
    model, tok, labels = pipe.model, pipe.tokenizer, pipe.model.config.labels
    for text, got in zip(texts, pipe(texts)):  # batched with padding
        ids = torch.tensor([[tok.cls_id, *tok.encode(text), tok.sep_id]])
        with torch.no_grad():
            cls_state = model.encode(ids)[:, 0]
            probs = model.head(torch.tanh(model.pooler.dense(cls_state))).softmax(-1)[0]
        assert got["label"] == labels[int(probs.argmax())] and got["score"] == pytest.approx(float(probs.max()), abs=1e-5)


def test_bf16_inference_agrees_with_fp32(yelp_run):
    texts = [line.rsplit("\t", 1)[0] for line in YELP.read_text().splitlines()[:200]]
    fp32 = pipeline("classify", yelp_run.checkpoint, device="cpu")(texts)
    bf16 = pipeline("classify", yelp_run.checkpoint, device="cpu", dtype="bfloat16")(texts)
    assert sum(a["label"] == b["label"] for a, b in zip(fp32, bf16)) >= 0.97 * len(texts)
    assert max(abs(a["score"] - b["score"]) for a, b in zip(fp32, bf16) if a["label"] == b["label"]) < 0.05


def test_lora_trains_only_adapters_and_head_and_merges_to_the_same_predictions(trained_run, tmp_path):
    base, _ = load_model(trained_run.out)
    run = finetune(trained_run.out, "classify", YELP, tmp_path / "lora", train=_cfg(max_steps=20, lr=1e-2),
                   lora=LoraConfig(r=4, alpha=8, targets="q,v"), **QUIET)
    # Independent count: per block, q and v each get A (4 x 64) and B (64 x 4); the head is 64 x 2 + 2.
    cfg = base.config
    assert run.trainable_params == cfg.n_layer * 2 * (4 * 64 + 64 * 4) + 64 * 2 + 2
    tuned, _ = load_model(run.checkpoint)
    tuned_state = tuned.state_dict()
    for k, v in base.state_dict().items():
        assert torch.equal(tuned_state[k], v), k  # the base weights did not move
    assert any(tuned_state[k].abs().sum() > 0 for k in tuned_state if ".lora_B." in k)
    merged = merge_lora(run.checkpoint, tmp_path / "merged")
    m, ck = load_model(merged)
    assert m.config.lora is None and not any(".lora_" in k for k in m.state_dict())
    x = torch.randint(0, cfg.vocab_size, (3, 12))
    torch.testing.assert_close(m.task_logits(x), tuned.task_logits(x), atol=1e-5, rtol=1e-5)
    texts = ["Great food!", "Terrible service.", "ok"]
    merged_out, adapter_out = pipeline(None, merged, device="cpu")(texts), pipeline(None, run.checkpoint, device="cpu")(texts)
    assert [p["label"] for p in merged_out] == [p["label"] for p in adapter_out]
    assert [p["score"] for p in merged_out] == pytest.approx([p["score"] for p in adapter_out], abs=1e-6)


def test_a_head_for_other_labels_starts_anew_and_one_for_the_same_labels_is_kept():
    """Re-fine-tuning a sentiment classifier for two other labels must not start from the old head, whose
    rows meant other classes; for the same labels (a second round of training) it is the head to keep."""
    from lmforge.finetune.run import _from_base

    torch.manual_seed(0)
    base = Transformer(preset("tiny", vocab_size=100, task_head="classify", labels=["neg", "pos"]))
    same = _from_base(base, base.config, seed=1)
    other = _from_base(base, base.config.replace(labels=["spam", "ham"]), seed=1)
    assert torch.equal(same.head.weight, base.head.weight)
    assert not torch.equal(other.head.weight, base.head.weight)
    assert torch.equal(other.layers[0].attention.qkv.weight, base.layers[0].attention.qkv.weight)


def test_freeze_layers_and_embeddings_keep_them_fixed(trained_run, tmp_path):
    base, _ = load_model(trained_run.out)
    run = finetune(trained_run.out, "classify", YELP, tmp_path / "frozen", train=_cfg(max_steps=5),
                   freeze_layers=1, freeze_embeddings=True, **QUIET)
    tuned, _ = load_model(run.checkpoint)
    before, after = base.state_dict(), tuned.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items() if k.startswith(("layers.0.", "tok_embeddings", "pos_embeddings")))
    assert not torch.equal(after["layers.1.attention.qkv.weight"], before["layers.1.attention.qkv.weight"])



def test_an_encoder_decoder_freezes_the_first_blocks_of_both_stacks(tmp_path_factory, tokenizer_dir, tmp_path):
    encdec = _base(tmp_path_factory, tokenizer_dir, "frozen-t5ish", arch="encoder-decoder", position="sinusoidal")
    src, tgt = _lines(MULTI30K / "train.en.gz", 40, tmp_path / "en.txt"), _lines(MULTI30K / "train.de.gz", 40, tmp_path / "de.txt")
    run = finetune(encdec, "seq2seq", src, tmp_path / "mt", target=tgt, train=_cfg(max_steps=3), freeze_layers=1, **QUIET)
    before, after = load_model(encdec)[0].state_dict(), load_model(run.checkpoint)[0].state_dict()
    first = [k for k in before if k.startswith(("encoder_layers.0.", "layers.0."))]
    assert any(k.startswith("encoder_layers.0.") for k in first) and all(torch.equal(after[k], before[k]) for k in first)
    assert not torch.equal(after["encoder_layers.1.attention.qkv.weight"], before["encoder_layers.1.attention.qkv.weight"])


def test_freezing_with_lora_is_refused(trained_run, tmp_path):
    """LoRA keeps every base weight fixed already; --freeze-layers would silently do nothing."""
    with pytest.raises(UserError, match="--freeze-layers and --freeze-embeddings are for a full fine-tune"):
        finetune(trained_run.out, "classify", YELP, tmp_path / "lora", train=_cfg(max_steps=1), freeze_layers=1,
                 lora=LoraConfig(r=4), **QUIET)
    with pytest.raises(UserError, match="'gate' needs model.mlp swiglu"):  # GPT-2's MLP has no gate to adapt
        finetune(trained_run.out, "classify", YELP, tmp_path / "gate", train=_cfg(max_steps=1),
                 lora=LoraConfig(r=4, targets="gate"), **QUIET)

def _wnut_slice(path, n_sentences):
    sentences = WNUT.read_text(encoding="utf-8").split("\n\t\n")[:n_sentences]  # WNUT ends a sentence with a line "\t"
    path.write_text("\n\t\n".join(sentences) + "\n", encoding="utf-8")
    return path


def test_tagging_on_wnut17_with_an_encoder(encoder, tmp_path):
    data = _wnut_slice(tmp_path / "wnut-slice.conll", 300)
    run = finetune(encoder, "tag", data, tmp_path / "tag", val=data, train=_cfg(max_steps=60, eval_interval=10), **QUIET)
    rows = [json.loads(line) for line in open(run.out / "metrics.jsonl")]
    val = [r["val_loss"] for r in rows if r["kind"] == "val"]
    assert val[-1] < val[0]
    result = evaluate_task(run.checkpoint, None, data, device="cpu")
    assert result["task"] == "tag" and result["examples"] == 300 and {"precision", "recall", "f1"} <= set(result)
    text = "Empire State Building, is in New York!"
    tagged = pipeline(None, run.checkpoint, device="cpu")(text)
    assert tagged["words"] == ["Empire", "State", "Building", ",", "is", "in", "New", "York", "!"]
    assert len(tagged["tags"]) == 9 and all(t == "O" or t[:2] in ("B-", "I-") for t in tagged["tags"])
    assert [e["type"] for e in tagged["entities"]] == [t[2:] for t in tagged["tags"] if t.startswith("B-")]
    assert all(text[e["start"]:e["end"]] == e["text"] for e in tagged["entities"])
    # predict on tokens only (no tag column); eval on them still asks for tags.
    sentences = [[line.split("\t")[0] for line in block.splitlines() if line.strip()] for block in data.read_text().split("\n\t\n")]
    tokens_only = tmp_path / "tokens.txt"
    tokens_only.write_text("\n\n".join("\n".join(words) for words in sentences[:20]) + "\n", encoding="utf-8")
    assert predict(run.checkpoint, tokens_only, tmp_path / "tags.jsonl", device="cpu") == 20
    rows = [json.loads(line) for line in open(tmp_path / "tags.jsonl")]
    assert [r["words"] for r in rows] == sentences[:20]
    assert [r["tags"] for r in rows] == [t["tags"] for t in pipeline(None, run.checkpoint, device="cpu")(sentences[:20])]
    with pytest.raises(UserError, match=r"tokens.txt:1 holds a token but no tag column"):
        evaluate_task(run.checkpoint, "tag", tokens_only, device="cpu")


def test_a_decoder_tagger_with_repeated_input_predicts_from_the_second_copy(trained_run, tmp_path):
    data = _wnut_slice(tmp_path / "wnut-slice.conll", 100)
    run = finetune(trained_run.out, "tag", data, tmp_path / "tag", repeat_input=True, train=_cfg(max_steps=10), **QUIET)
    pipe = pipeline(None, run.checkpoint, device="cpu")
    assert pipe.format.repeat  # read back from the checkpoint's trainer state
    tok = pipe.tokenizer
    spaced = [tok.decode([i]) for i in range(tok.vocab_size)]
    words = [w[1:] for w in spaced if w[:1] == " " and w[1:].isalpha() and len(tok.encode(w[1:])) == 1][:8]
    ids = tok.encode(" ".join(words))
    assert len(ids) == len(words)  # one token per word, so the second copy's word i is at len(ids) + 1 + i
    layout = [*ids, tok.eot_id, *ids, tok.eot_id]
    feature, first = pipe.format.tag(words)
    assert feature["input_ids"] == layout and first == [len(ids) + 1 + i for i in range(len(words))]
    logits = pipe.model.task_logits(torch.tensor([layout]))[0]
    labels = pipe.model.config.labels
    raw = [labels[int(logits[len(ids) + 1 + i].argmax())] for i in range(len(words))]
    assert pipe([words])[0]["tags"] == _valid_iob2(raw)
    with pytest.raises(UserError, match="does not use it"):
        finetune(trained_run.out, "classify", YELP, tmp_path / "c", repeat_input=True, **QUIET)


def _squad_slice(path, n_articles=3, n_paragraphs=3):
    doc = json.loads(SQUAD.read_text(encoding="utf-8"))
    doc["data"] = [dict(a, paragraphs=a["paragraphs"][:n_paragraphs]) for a in doc["data"][:n_articles]]
    path.write_text(json.dumps(doc), encoding="utf-8")
    return path


def test_qa_trains_on_some_articles_and_is_scored_on_the_others(trained_run, tmp_path):
    data = _squad_slice(tmp_path / "squad.json")
    run = finetune(trained_run.out, "qa", data, tmp_path / "qa", split_articles=0.67, doc_stride=32,
                   train=_cfg(max_steps=30, eval_interval=30), **QUIET)
    assert run.val_loss is not None
    result = evaluate_task(run.checkpoint, "qa", data, split_articles=0.67, device="cpu")
    doc = json.loads(data.read_text())
    n_questions = {a["title"]: sum(len(p["qas"]) for p in a["paragraphs"]) for a in doc["data"]}
    assert result["examples"] in n_questions.values()  # exactly one held-out article
    assert 0 <= result["exact_match"] <= result["f1"] <= 100
    answer = pipeline("qa", run.checkpoint, device="cpu")(question="Who?", context="Denver Broncos won the game.")
    assert answer["answer"] and "Denver Broncos won the game."[answer["start"]:answer["end"]] == answer["answer"]


def test_encoder_qa_marks_the_context_with_token_types_and_predicts_without_answers(encoder, tmp_path):
    data = _squad_slice(tmp_path / "squad.json")
    run = finetune(encoder, "qa", data, tmp_path / "qa", split_articles=0.67, doc_stride=32,
                   train=_cfg(max_steps=30, eval_interval=15), **QUIET)
    val = [r["val_loss"] for r in map(json.loads, open(run.out / "metrics.jsonl")) if r["kind"] == "val"]
    assert val[-1] < val[0]
    pipe = pipeline(None, run.checkpoint, device="cpu")
    tok, question, context = pipe.tokenizer, "Who won?", "Denver Broncos won the game."
    [window] = pipe.format.qa(question, context)
    head = [tok.cls_id, *tok.encode(question), tok.sep_id]  # [CLS] question [SEP] context [SEP]
    assert window.feature["input_ids"] == [*head, *tok.encode(context), tok.sep_id]
    assert window.feature["token_type_ids"] == [0] * len(head) + [1] * (len(tok.encode(context)) + 1)
    ids, types = torch.tensor([window.feature["input_ids"]]), torch.tensor([window.feature["token_type_ids"]])
    with torch.no_grad():  # segment B's embedding is trained and used
        assert not torch.allclose(pipe.model.task_logits(ids, token_type_ids=types), pipe.model.task_logits(ids))
    base, _ = load_model(encoder)
    assert not torch.equal(base.type_embeddings.weight[1], pipe.model.type_embeddings.weight[1])
    result = evaluate_task(run.checkpoint, None, data, split_articles=0.67, device="cpu")
    assert result["task"] == "qa" and 0 <= result["exact_match"] <= result["f1"] <= 100
    # predict reads questions without answers; train and eval still require them.
    doc = json.loads(data.read_text())
    for article in doc["data"]:
        for paragraph in article["paragraphs"]:
            paragraph["qas"] = [{"id": qa["id"], "question": qa["question"]} for qa in paragraph["qas"]]
    unlabelled = tmp_path / "questions.json"
    unlabelled.write_text(json.dumps(doc), encoding="utf-8")
    n = predict(run.checkpoint, unlabelled, tmp_path / "pred.jsonl", device="cpu")
    rows = [json.loads(line) for line in open(tmp_path / "pred.jsonl")]
    assert n == len(rows) == sum(len(p["qas"]) for a in doc["data"] for p in a["paragraphs"])
    assert all(row["id"] and row["question"] and "answer" in row for row in rows)
    with pytest.raises(UserError, match=r"questions.json:1: question \S+: missing 'answers'"):
        evaluate_task(run.checkpoint, "qa", unlabelled, device="cpu")


def test_qa_span_decoding_takes_the_best_valid_span_within_the_context():
    from lmforge.infer.pipeline import _best_span

    offsets = [None, None, (0, 5), (5, 9), (9, 14), None]
    logits = torch.full((6, 2), -5.0)
    logits[0] = torch.tensor([9.0, 9.0])  # the question: never an answer
    logits[4, 0], logits[3, 1] = 4.0, 5.0  # start after end: invalid
    logits[2, 0], logits[3, 1] = 3.0, 5.0
    assert _best_span(logits, offsets, max_len=30) == (8.0, 0, 9)
    assert _best_span(logits, offsets, max_len=1)[1:] == (5, 9)  # max_len 1: the best single token


def _lines(src, n, out):
    with gzip.open(src, "rt", encoding="utf-8") as f:
        out.write_text("".join(next(f) for _ in range(n)), encoding="utf-8")
    return out


def test_translation_with_an_encoder_decoder_and_predictions_as_jsonl(tmp_path_factory, tokenizer_dir, tmp_path):
    encdec = _base(tmp_path_factory, tokenizer_dir, "t5ish", arch="encoder-decoder", position="sinusoidal")
    src, tgt = _lines(MULTI30K / "train.en.gz", 300, tmp_path / "en.txt"), _lines(MULTI30K / "train.de.gz", 300, tmp_path / "de.txt")
    run = finetune(encdec, "seq2seq", src, tmp_path / "mt", target=tgt, val=src, val_target=tgt,
                   train=_cfg(max_steps=40, eval_interval=20), **QUIET)
    val = [r["val_loss"] for r in map(json.loads, open(run.out / "metrics.jsonl")) if r["kind"] == "val"]
    assert val[-1] < val[0]
    result = evaluate_task(run.checkpoint, "seq2seq", src, target=tgt, limit=5, max_new_tokens=8, device="cpu")
    assert result["examples"] == 5 and {"bleu", "chrf", "rouge1", "rouge2", "rougeL"} <= set(result)
    beams = pipeline("seq2seq", run.checkpoint, device="cpu", max_new_tokens=6, num_beams=3)
    greedy = pipeline("seq2seq", run.checkpoint, device="cpu", max_new_tokens=6)
    alone = pipeline("seq2seq", run.checkpoint, device="cpu", max_new_tokens=6, batch_size=1)
    sentences = src.read_text().splitlines()[:5]
    assert greedy(sentences) == alone(sentences) and len(beams(sentences)) == 5  # padded batch = each source alone
    unbounded = pipeline("seq2seq", run.checkpoint, device="cpu", max_new_tokens=10_000)  # stops at the decoder's context
    assert len(unbounded(sentences[:1])) == 1
    n = predict(run.checkpoint, src, tmp_path / "pred.jsonl", target=tgt, max_new_tokens=4, device="cpu")
    rows = [json.loads(line) for line in open(tmp_path / "pred.jsonl")]
    assert n == len(rows) == 300 and rows[0]["source"] == src.read_text().splitlines()[0] and "prediction" in rows[0]


def test_summarization_with_a_decoder_trains_on_the_target_only(trained_run, tmp_path):
    data = tmp_path / "tldr.jsonl"
    data.write_text("".join(SCITLDR.read_text(encoding="utf-8").splitlines(keepends=True)[:40]), encoding="utf-8")
    run = finetune(trained_run.out, "seq2seq", data, tmp_path / "sum", val=data, prompt="{source}\nTL;DR:",
                   train=_cfg(max_steps=30, eval_interval=15), **QUIET)
    val = [r["val_loss"] for r in map(json.loads, open(run.out / "metrics.jsonl")) if r["kind"] == "val"]
    assert val[-1] < val[0]
    result = evaluate_task(run.checkpoint, None, data, limit=3, max_new_tokens=8, device="cpu")
    assert result["task"] == "seq2seq" and result["examples"] == 3
    # Batched greedy decoding (the engine) writes what one-at-a-time greedy decoding does.
    pipe = pipeline(None, run.checkpoint, device="cpu", max_new_tokens=8, batch_size=3)
    sources = [json.loads(line)["source"][0] for line in data.read_text().splitlines()[:3]]
    lm = load(run.checkpoint, device="cpu")
    # The prompts are as long as the fine-tune's: half of its 64 tokens (the other half is the target's).
    alone = [lm.generate(pipe.tokenizer.decode(pipe.format.prompt_ids(s, 32)), 8, temperature=0).strip() for s in sources]
    assert pipe(sources) == alone


def test_chat_sft_lowers_the_loss_on_assistant_turns(trained_run, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(trained_run.checkpoint, base)
    cfg = json.loads((base / "tokenizer_config.json").read_text())
    (base / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": CHATML}))
    data = tmp_path / "chat.jsonl"
    colours = ["red", "blue", "green", "white"]
    data.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"What colour is the {thing}?"},
        {"role": "assistant", "content": f"The {thing} is {c}."}]}) + "\n"
        for thing, c in zip(["rose", "sky", "grass", "snow"], colours)), encoding="utf-8")
    before = evaluate_task(base, "sft", data, device="cpu")["loss"]
    run = finetune(base, "sft", data, tmp_path / "sft", train=_cfg(max_steps=40), **QUIET)
    after = evaluate_task(run.checkpoint, None, data, device="cpu")["loss"]
    assert after < before / 2
    reply = pipeline(None, run.checkpoint, device="cpu", max_new_tokens=12)([{"role": "user", "content": "What colour is the sky?"}])
    assert isinstance(reply, str)


def test_sft_on_a_conversation_that_opens_with_the_assistant_and_a_template_it_cannot_use_names_the_line(
        trained_run, tmp_path):
    """SmolLM2's template adds its default system prompt on loop.first, so the empty conversation
    before a greeting is no prefix of the one that opens with it; the greeting is still found. An
    unusable template is refused naming the line, by finetune and by eval."""
    base = tmp_path / "base"
    shutil.copytree(trained_run.checkpoint, base)
    cfg = json.loads((base / "tokenizer_config.json").read_text())
    smol = ("{% for m in messages %}{% if loop.first and messages[0]['role'] != 'system' %}<|im_start|>system\nBe kind"
            "<|im_end|>\n{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    (base / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": smol}))
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Ho"}]}) + "\n"
                    + json.dumps({"messages": [{"role": "assistant", "content": "Hello! How can I help?"},
                                               {"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"}]}) + "\n")
    run = finetune(base, "sft", data, tmp_path / "sft", train=_cfg(max_steps=2), **QUIET)
    assert math.isfinite(run.train_loss)
    (base / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": smol.replace("m['content']", "m['content'] | upper")}))
    with pytest.raises(UserError, match=rf"^{data}:2: the chat template neither renders"):
        finetune(base, "sft", data, tmp_path / "x", train=_cfg(max_steps=2), **QUIET)
    with pytest.raises(UserError, match=rf"^{data}:2: the chat template neither renders"):
        evaluate_task(base, "sft", data, device="cpu")


def test_bad_input_is_one_line(trained_run, encoder, yelp_run, tmp_path):
    other = tmp_path / "other.tsv"  # labels of another data set: the wrong file, not a score of 0
    other.write_text("good\tpos\nbad\tneg\n")
    with pytest.raises(UserError, match=r"other.tsv.*'neg', 'pos'.*'0', '1'"):
        evaluate_task(yelp_run.checkpoint, "classify", other, device="cpu")
    with pytest.raises(UserError, match="fine-tunes decoder or encoder-decoder models"):
        finetune(encoder, "seq2seq", YELP, tmp_path / "x", **QUIET)
    with pytest.raises(UserError, match="--val-target is the target file line-aligned with --val"):
        finetune(trained_run.out, "seq2seq", YELP, tmp_path / "v", target=YELP, val_target=YELP, **QUIET)
    with pytest.raises(UserError, match="no LoRA adapters"):
        merge_lora(yelp_run.checkpoint, tmp_path / "m")
    with pytest.raises(UserError, match="has no span head"):
        pipeline("qa", yelp_run.checkpoint, device="cpu")
    empty = tmp_path / "empty.tsv"
    empty.write_text("")
    with pytest.raises(UserError, match="empty.tsv"):
        finetune(trained_run.out, "classify", empty, tmp_path / "y", **QUIET)


def test_options_a_task_does_not_use_are_refused_not_ignored(yelp_run, trained_run, tmp_path_factory, tokenizer_dir, tmp_path):
    """Seen in review: --num-beams on a classifier, --length-penalty with greedy decoding, generation options
    on eval --task sft (a loss), --split with text files all ran and changed nothing."""
    for options, flag in (({"num_beams": 4}, "--num-beams applies to --task seq2seq and sft, not classify"),
                          ({"max_new_tokens": 9}, "--max-new-tokens applies to --task seq2seq and sft, not classify"),
                          ({"max_answer_length": 9}, "--max-answer-length applies to --task qa, not classify"),
                          ({"length_penalty": 0.5}, "--length-penalty applies to --task seq2seq and sft, not classify")):
        with pytest.raises(UserError, match=flag):
            evaluate_task(yelp_run.checkpoint, None, YELP, limit=2, device="cpu", **options)
        with pytest.raises(UserError, match=flag):
            predict(yelp_run.checkpoint, YELP, tmp_path / "p.jsonl", device="cpu", **options)
    with pytest.raises(UserError, match="--length-penalty ranks the hypotheses of beam search; add --num-beams"):
        pipeline("seq2seq", trained_run.out, device="cpu", length_penalty=0.6)
    pipeline("seq2seq", trained_run.out, device="cpu", length_penalty=0.6, num_beams=2)  # with beams it applies
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}) + "\n")
    for options in ({"num_beams": 2}, {"length_penalty": 0.5}):
        with pytest.raises(UserError, match="does not apply: eval --task sft scores the loss"):
            evaluate_task(trained_run.out, "sft", chat, device="cpu", **options)
    # An encoder-decoder has no chat format: sft was a traceback deep in the model (finetune refused it already).
    encdec = _base(tmp_path_factory, tokenizer_dir, "chat-encdec", arch="encoder-decoder", position="sinusoidal")
    with pytest.raises(UserError, match="--task sft runs on decoder models, but .* is an encoder-decoder"):
        predict(encdec, chat, tmp_path / "p.jsonl", task="sft", device="cpu")
    # A classifier's LM head is its base's: a plain LM eval of it is refused, pointing to --task.
    with pytest.raises(UserError, match="has a classify head, fine-tuned for --task classify; score it with"):
        evaluate_lm(yelp_run.checkpoint, YELP, device="cpu")
    with pytest.raises(UserError, match="--split val selects a split of a prepared data directory"):
        evaluate_lm(trained_run.out, YELP, split="val", device="cpu")
    assert not (tmp_path / "p.jsonl").exists()


def test_python_callers_get_the_cli_defaults_and_their_labels_checked(trained_run, tmp_path):
    """Seen in review: labels="0,1" trained a head of the labels '0', ',' and '1', whose checkpoint nothing
    could open; train=TrainConfig(max_steps=N) silently ran at pretraining's lr, 12x the CLI's."""
    with pytest.raises(UserError, match=r"labels is '0,1'; pass a list of label names"):
        finetune(trained_run.out, "classify", YELP, tmp_path / "bad", labels="0,1", **QUIET)
    assert not (tmp_path / "bad").exists()
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        run = finetune(trained_run.out, "classify", YELP, tmp_path / "ft", progress=False, log=None,  # None: silent
                       train={"max_steps": 2, "device": "cpu", "threads": 1, "tensorboard": False})
        assert torch.get_num_threads() == 2  # train.threads held for the run only
    finally:
        torch.set_num_threads(threads)
    state = json.loads((run.checkpoint / "trainer_state.json").read_text())["train"]
    assert state["max_steps"] == 2 and state["lr"] == FINETUNE_DEFAULTS["lr"] and state["warmup_steps"] == FINETUNE_DEFAULTS["warmup_steps"]


def test_predict_checks_its_output_before_the_predictions(yelp_run, tmp_path):
    """Seen in review: an unwritable --out folder was found after every prediction was made, and an early
    failure left the folders made for --out behind."""
    locked = tmp_path / "locked"
    locked.write_text("a file where the --out folder would be")
    with pytest.raises(UserError, match="cannot create directory .*locked is a file"):
        predict(yelp_run.checkpoint, tmp_path / "missing.tsv", locked / "p.jsonl", device="cpu")
    with pytest.raises(UserError, match="missing.tsv"):  # the data is checked after the output
        predict(yelp_run.checkpoint, tmp_path / "missing.tsv", tmp_path / "new" / "deeper" / "p.jsonl", device="cpu")
    assert not (tmp_path / "new").exists()
    for out, message in ((tmp_path / "p.jsonl.gz", "predict writes plain JSON lines, not .gz"),
                         (f"{tmp_path}/newdir/", "is a directory")):
        with pytest.raises(UserError, match=message):
            predict(yelp_run.checkpoint, YELP, out, device="cpu")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["locked"]


def test_eval_scores_a_gold_label_the_model_never_saw_as_a_miss(tmp_path_factory, tokenizer_dir, tmp_path):
    tagger = _base(tmp_path_factory, tokenizer_dir, "tagger", task_head="tag", labels=["O", "B-PER", "I-PER"])
    data = tmp_path / "gold.conll"
    data.write_text("Peter\tB-PER\nlives\tO\n\nin\tO\nBerlin\tB-LOC\n")  # LOC: not one of the model's tags
    result = evaluate_task(tagger, "tag", data, device="cpu")
    predicted = [p["tags"] for p in pipeline("tag", tagger, device="cpu")([["Peter", "lives"], ["in", "Berlin"]])]
    gold = [["B-PER", "O"], ["O", "B-LOC"]]
    assert {k: result[k] for k in ("precision", "recall", "f1")} == entity_f1(predicted, gold)
    assert result["examples"] == 2 and result["recall"] <= 50.0  # the LOC entity is a miss
    only_unknown = tmp_path / "other.conll"
    only_unknown.write_text("Berlin\tB-LOC\nis\tO\n")
    with pytest.raises(UserError, match=r"other.conll.*'LOC'.*'PER'"):
        evaluate_task(tagger, "tag", only_unknown, device="cpu")

    classifier = _base(tmp_path_factory, tokenizer_dir, "classifier", task_head="classify", labels=["0", "1"])
    data = tmp_path / "gold.tsv"
    data.write_text("good\t1\nbad\t0\nso-so\t2\n")
    result = evaluate_task(classifier, "classify", data, device="cpu")
    predicted = [p["label"] for p in pipeline("classify", classifier, device="cpu")(["good", "bad", "so-so"])]
    assert result["accuracy"] == accuracy(predicted, ["1", "0", "2"]) <= 200 / 3
    assert result["macro_f1"] == macro_f1(predicted, ["1", "0", "2"])


def test_predict_seq2seq_on_sources_without_targets(trained_run, tmp_path):
    sources = tmp_path / "src.en"
    sources.write_text("A man rides a horse.\nTwo dogs play.\n")
    assert predict(trained_run.out, sources, tmp_path / "p.jsonl", task="seq2seq", max_new_tokens=2, device="cpu") == 2
    rows = [json.loads(line) for line in open(tmp_path / "p.jsonl")]
    assert [(r["where"], r["source"]) for r in rows] == [(f"{sources}:1", "A man rides a horse."), (f"{sources}:2", "Two dogs play.")]
    assert all(isinstance(r["prediction"], str) for r in rows)
    jsonl = tmp_path / "src.jsonl"
    jsonl.write_text('{"source": "A man rides a horse."}\n')
    assert predict(trained_run.out, jsonl, tmp_path / "q.jsonl", task="seq2seq", max_new_tokens=2, device="cpu") == 1
    with pytest.raises(UserError, match="--target"):
        evaluate_task(trained_run.out, "seq2seq", sources, device="cpu")


def test_predict_sft_replies_to_conversations_without_a_reply(trained_run, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(trained_run.checkpoint, base)
    cfg = json.loads((base / "tokenizer_config.json").read_text())
    (base / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": CHATML}))
    user, reply = {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}
    again = {"role": "user", "content": "And?"}
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": m}) + "\n" for m in ([user], [user, reply], [user, reply, again])))
    assert predict(base, data, tmp_path / "p.jsonl", task="sft", max_new_tokens=2, device="cpu") == 3
    rows = [json.loads(line) for line in open(tmp_path / "p.jsonl")]
    # The reference reply at the end is left out; a conversation that ends with the user is answered.
    assert [r["messages"] for r in rows] == [[user], [user], [user, reply, again]]
    assert all(isinstance(r["reply"], str) for r in rows)
    data.write_text(json.dumps({"messages": [reply]}) + "\n")
    with pytest.raises(UserError, match=r"chat.jsonl:1.*no user message"):
        predict(base, data, tmp_path / "p.jsonl", task="sft", max_new_tokens=2, device="cpu")


def test_qa_predictions_without_a_span_are_strict_json(tmp_path_factory, tokenizer_dir, tmp_path):
    reader = _base(tmp_path_factory, tokenizer_dir, "reader", task_head="span")
    doc = {"data": [{"title": "T", "paragraphs": [
        {"context": "", "qas": [{"id": "q1", "question": "Who?"}]},
        {"context": "Denver won the game.", "qas": [{"id": "q2", "question": "Who won?"}]}]}]}
    data = tmp_path / "q.json"
    data.write_text(json.dumps(doc))
    assert predict(reader, data, tmp_path / "p.jsonl", task="qa", device="cpu") == 2

    def no_constants(name):
        raise AssertionError(f"{name} is not JSON")

    rows = [json.loads(line, parse_constant=no_constants) for line in open(tmp_path / "p.jsonl")]
    assert (rows[0]["answer"], rows[0]["score"]) == ("", None)
    assert rows[1]["answer"] and isinstance(rows[1]["score"], float)


def test_a_fine_tune_is_refused_for_another_task_and_a_base_model_serves_every_generation_task(
        yelp_run, trained_run, tmp_path_factory, tokenizer_dir, tmp_path):
    """A classifier's LM head was never tuned: scoring it as seq2seq or sft would be a score of another
    model. A base model (no fine-tune on record) is still run zero-shot."""
    src, tgt = _lines(MULTI30K / "val.en.gz", 20, tmp_path / "en.txt"), _lines(MULTI30K / "val.de.gz", 20, tmp_path / "de.txt")
    with pytest.raises(UserError, match=r"fine-tuned for --task classify, not seq2seq; use --task classify"):
        evaluate_task(yelp_run.checkpoint, "seq2seq", src, target=tgt, limit=2, max_new_tokens=2, device="cpu")
    with pytest.raises(UserError, match=r"fine-tuned for --task classify, not seq2seq"):
        predict(yelp_run.checkpoint, src, tmp_path / "p.jsonl", task="seq2seq", max_new_tokens=2, device="cpu")
    assert not (tmp_path / "p.jsonl").exists()
    with pytest.raises(UserError, match=r"fine-tuned for --task classify, not sft"):
        pipeline("sft", yelp_run.checkpoint, device="cpu")
    tagger = _base(tmp_path_factory, tokenizer_dir, "bare-tagger", task_head="tag", labels=["O", "B-PER", "I-PER"])
    with pytest.raises(UserError, match=r"fine-tuned for --task tag, not seq2seq"):  # a head, though no record
        pipeline("seq2seq", tagger, device="cpu")
    summarizer = finetune(trained_run.out, "seq2seq", src, tmp_path / "mt", target=tgt, train=_cfg(max_steps=2), **QUIET)
    with pytest.raises(UserError, match=r"fine-tuned for --task seq2seq, not sft"):
        pipeline("sft", summarizer.checkpoint, device="cpu")
    assert pipeline("seq2seq", summarizer.checkpoint, device="cpu").task == "seq2seq"
    for task in ("seq2seq", "sft"):
        assert pipeline(task, trained_run.checkpoint, device="cpu").task == task


def test_generated_text_leaves_special_tokens_out(trained_run, monkeypatch):
    """As transformers' text2text pipelines (skip_special_tokens=True): a translation or summary a model
    wrote with a `<pad>` or `<|im_start|>` in it scores and reads as its words alone."""
    pipe = pipeline("seq2seq", trained_run.checkpoint, device="cpu")
    tok = pipe.tokenizer
    words, specials = tok.encode(" a man"), [tok.pad_id, tok.sep_id]
    monkeypatch.setattr(type(pipe), "_complete", lambda self, items: [words[:1] + specials + words[1:] + [tok.eot_id]])
    assert pipe(["ein Mann"]) == [tok.decode(words).strip()] != [tok.decode(words[:1] + specials + words[1:]).strip()]


def test_decoder_seq2seq_generation_keeps_the_prompt_length_it_was_fine_tuned_on(tmp_path_factory, tokenizer_dir, tmp_path,
                                                                                  monkeypatch):
    """A decoder with a context of 256 fine-tuned with seq_len 64 saw prompts of at most 64 tokens;
    generation keeps 32 (half of max_length, as `TaskFormat.seq2seq` lays a source out), not the 248
    the context leaves after 8 new tokens, which would be text of a length the fine-tune never saw."""
    base = _base(tmp_path_factory, tokenizer_dir, "ctx256", context_length=256)
    src, tgt = _lines(MULTI30K / "val.en.gz", 20, tmp_path / "en.txt"), _lines(MULTI30K / "val.de.gz", 20, tmp_path / "de.txt")
    run = finetune(base, "seq2seq", src, tmp_path / "mt", target=tgt, train=_cfg(max_steps=2, seq_len=64), **QUIET)
    seen = []
    generate = Engine.generate
    monkeypatch.setattr(Engine, "generate", lambda self, prompts, params: seen.extend(map(len, prompts)) or generate(self, prompts, params))
    source = "A man in a blue shirt is standing on a ladder cleaning windows. " * 40
    pipe = pipeline(None, run.checkpoint, device="cpu", max_new_tokens=8)
    pipe([source])
    assert seen == [32] == [len(pipe.format.seq2seq(source)["input_ids"])]
    pipeline(None, run.checkpoint, device="cpu", max_new_tokens=240)([source])  # the context still bounds it
    assert seen[-1] == 256 - 240
    pipeline("seq2seq", base, device="cpu", max_new_tokens=8)([source])  # a base model: what the context leaves
    assert seen[-1] == 256 - 8


def test_sft_batches_without_assistant_tokens_weigh_nothing(trained_run, tmp_path):
    """A conversation whose reply lies past max_length has no target: a micro-batch or a validation
    batch of only such conversations adds nothing (it made the step's loss nan, and eval's loss
    depend on the batch size). Data without any reply in reach is refused in one line."""
    base = tmp_path / "base"
    shutil.copytree(trained_run.checkpoint, base)
    cfg = json.loads((base / "tokenizer_config.json").read_text())
    (base / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": CHATML}))
    short = {"messages": [{"role": "user", "content": "Good morrow."}, {"role": "assistant", "content": "Good morrow, my lord."}]}
    long = {"messages": [{"role": "user", "content": "Speak " * 80}, {"role": "assistant", "content": "I will."}]}
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(c) + "\n" for c in [short, long] * 8))
    run = finetune(base, "sft", data, tmp_path / "sft", val=data,
                   train=_cfg(max_steps=6, eval_interval=3, eval_batches=4, batch_size=1, grad_accum=2), **QUIET)
    assert math.isfinite(run.train_loss) and math.isfinite(run.val_loss) and run.skipped_steps == 0
    one = evaluate_task(run.checkpoint, None, data, batch_size=1, device="cpu")["loss"]
    assert math.isfinite(one) and one == pytest.approx(evaluate_task(run.checkpoint, None, data, batch_size=16, device="cpu")["loss"])
    unreachable = tmp_path / "long.jsonl"
    unreachable.write_text(json.dumps(long) + "\n")
    with pytest.raises(UserError, match=r"no conversation in .*long.jsonl has an assistant token within the first 64 tokens"):
        finetune(base, "sft", unreachable, tmp_path / "x", train=_cfg(max_steps=2), **QUIET)
    with pytest.raises(UserError, match=r"no conversation in .*long.jsonl has an assistant token"):
        finetune(base, "sft", data, tmp_path / "y", val=unreachable, train=_cfg(max_steps=2), **QUIET)
    with pytest.raises(UserError, match="no assistant tokens"):
        evaluate_task(run.checkpoint, None, unreachable, device="cpu")


def test_freezing_every_weight_is_refused_before_training():
    """Seen in review: a post-norm encoder-decoder with a tied head (Transformer-base) frozen whole
    started training and died at the first backward with a RuntimeError."""
    from lmforge.config import preset
    from lmforge.finetune.run import _freeze
    from lmforge.model import Transformer

    net = Transformer(preset("transformer-base", n_layer=1, n_encoder_layer=1, n_embd=32, n_head=2, mlp_hidden=64,
                             vocab_size=64, context_length=16))
    _freeze(net, embeddings=True, layers=0)  # the blocks still train
    with pytest.raises(UserError, match=r"^--freeze-layers 1 and --freeze-embeddings leave no weight of this model to "
                                        r"train; freeze fewer layers, or keep the embeddings trainable$"):
        _freeze(net, embeddings=True, layers=1)
