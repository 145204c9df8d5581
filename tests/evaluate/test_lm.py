import math
import types

import numpy as np
import pytest
import torch

from lmforge.checkpoint import load_model
from lmforge.data import load_meta
from lmforge.evaluate import evaluate_lm, evaluate_task
from lmforge.evaluate.lm import _sum_nll
from lmforge.utils.errors import UserError


def test_short_text_matches_direct_log_likelihood(trained_run, tmp_path):
    text = "KING HENRY:\nWhat say you, my lord? — Ay, très bien.\n"  # bits per byte: UTF-8 bytes, not characters
    (tmp_path / "t.txt").write_text(text, encoding="utf-8")
    result = evaluate_lm(trained_run.out, [tmp_path / "t.txt"], device="cpu")

    model, ckpt = load_model(trained_run.out)
    ids = ckpt.tokenizer.encode(text)  # one document: nothing after it, as transformers scores a text
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids[:-1]]))[0].double(), dim=-1)
    nll = -sum(logp[i, ids[i + 1]].item() for i in range(len(ids) - 1))
    assert result["tokens"] == len(ids) - 1
    assert result["bytes"] == len(text.encode())
    assert result["loss"] == pytest.approx(nll / (len(ids) - 1), rel=1e-5)
    assert result["bpb"] == pytest.approx(nll / (len(text.encode()) * math.log(2)), rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]))


@pytest.mark.parametrize("extra", [1, 2, 3])
def test_every_token_after_the_first_is_scored_once_whatever_the_last_window_holds(trained_run, extra):
    """Full context windows, then what is left: a last window of two tokens still predicts one."""
    model, _ = load_model(trained_run.out)
    T, V = model.config.context_length, model.config.vocab_size
    tokens = (np.arange(2 * T + extra) * 7) % V
    total, count = _sum_nll(model, tokens, 4, torch.device("cpu"), None)
    with torch.no_grad():
        pieces = [tokens[s : s + T + 1] for s in range(0, len(tokens) - 1, T)]
        nll = sum(-torch.log_softmax(model(torch.tensor(p[None, :-1]))[0].double(), -1)[range(len(p) - 1), p[1:]].sum().item()
                  for p in pieces)
    assert count == len(tokens) - 1 and total == pytest.approx(nll, rel=1e-5)


def test_documents_of_raw_text_are_separated_by_end_of_text(trained_run, tmp_path):
    """Between two documents their end-of-text is scored, after the last nothing; text spelling another
    special token is text, as `prepare` reads it."""
    a, b = "KING HENRY:\nWhat say you?\n", "<|pad|> my lord\n"
    (tmp_path / "a.txt").write_text(a)
    (tmp_path / "b.txt").write_text(b)
    result = evaluate_lm(trained_run.out, [tmp_path / "a.txt", tmp_path / "b.txt"], device="cpu")
    model, ckpt = load_model(trained_run.out)
    tok = ckpt.tokenizer
    b_ids = tok.encode_batch([b], eot_only=True)[0]
    assert tok.pad_id not in b_ids
    ids = tok.encode(a) + [tok.eot_id] + b_ids
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids[:-1]]))[0].double(), dim=-1)
    nll = -sum(logp[i, ids[i + 1]].item() for i in range(len(ids) - 1))
    assert result["tokens"] == len(ids) - 1 and result["loss"] == pytest.approx(nll / (len(ids) - 1), rel=1e-5)


def test_prepared_val_split(trained_run, data_dir):
    result = evaluate_lm(trained_run.out, data_dir, device="cpu")
    val = load_meta(data_dir)["splits"]["val"]
    assert result["tokens"] == val["tokens"] - 1 and result["bytes"] == val["bytes"]
    # The run's own periodic validation used a sample of the same split: close, not equal.
    assert result["loss"] == pytest.approx(trained_run.val_loss, abs=0.15)


def test_data_from_another_tokenizer_is_refused(trained_run, tmp_path, corpus_file):
    from lmforge.data import prepare, train_tokenizer

    train_tokenizer([corpus_file], 300, tmp_path / "tok")
    prepare([corpus_file], tmp_path / "tok", tmp_path / "data", progress=False)
    with pytest.raises(UserError, match="different tokenizer"):
        evaluate_lm(trained_run.out, tmp_path / "data", device="cpu")


def test_parallel_pairs_are_not_token_shards(trained_run, tmp_path):
    from lmforge.data import prepare_parallel

    (tmp_path / "s").write_text("to be\nor not to be\n")
    (tmp_path / "t").write_text("sein\noder nicht sein\n")
    prepare_parallel(tmp_path / "s", tmp_path / "t", trained_run.checkpoint, tmp_path / "pairs", val_fraction=0.5)
    with pytest.raises(UserError, match=r"pairs holds parallel pairs .*token shards"):
        evaluate_lm(trained_run.out, tmp_path / "pairs", device="cpu")


def test_a_run_or_checkpoint_directory_as_data_is_named_as_such(trained_run):
    """Seen in review: `eval run --data run` read the run's files as text and blamed metrics.jsonl:1."""
    for path in (trained_run.out, trained_run.checkpoint):
        with pytest.raises(UserError, match=rf"{path} is a checkpoint or run directory, not text to evaluate on"):
            evaluate_lm(trained_run.out, [path], device="cpu")


def test_the_padded_vocabulary_takes_no_probability(trained_run, tmp_path):
    """The LM head's rows past the vocabulary (padding for fast matmuls) are ids no text holds and that
    generation never samples: eval scores over the real vocabulary, as transformers scores an exported
    model (seen in review: their logits took probability mass and eval disagreed with transformers)."""
    from dataclasses import replace

    from lmforge.checkpoint import save_checkpoint
    from lmforge.model import Transformer

    model, ckpt = load_model(trained_run.out)
    padded = Transformer(replace(model.config, pad_vocab_multiple=768))  # 512 -> 768 rows
    with torch.no_grad():
        for name, p in padded.named_parameters():
            trained = model.state_dict()[name]
            p.copy_(torch.cat([trained, torch.randn(p.shape[0] - trained.shape[0], *p.shape[1:])])
                    if p.shape != trained.shape else trained)
    save_checkpoint(tmp_path / "padded", padded, ckpt.tokenizer)
    text = "KING HENRY:\nWhat say you, my lord?\n"
    (tmp_path / "t.txt").write_text(text)
    result = evaluate_lm(tmp_path / "padded", [tmp_path / "t.txt"], device="cpu")
    ids = ckpt.tokenizer.encode(text)
    with torch.no_grad():
        assert padded(torch.tensor([ids[:-1]]))[0, :, 512:].abs().max() > 1  # the padding would take real mass
        logp = torch.log_softmax(model(torch.tensor([ids[:-1]]))[0].double(), dim=-1)  # the same model, unpadded
    nll = -sum(logp[i, ids[i + 1]].item() for i in range(len(ids) - 1))
    assert result["loss"] == pytest.approx(nll / (len(ids) - 1), rel=1e-5)



# ---------------------------------------------------------------- evaluate_task: what it asks the pipeline, how it scores


class _Pipe:
    """A stand-in for the pipeline `evaluate_task` makes: answers `outputs`, in order."""

    def __init__(self, task, outputs, labels=None):
        self.task, self.outputs = task, outputs
        self.model = types.SimpleNamespace(config=types.SimpleNamespace(labels=labels))

    def __call__(self, inputs):
        return self.outputs[: len(inputs)]


def _fake_pipeline(monkeypatch, pipe):
    """`evaluate_task`'s pipeline replaced by `pipe`; the list of (task, checkpoint, options) it was asked for."""
    import lmforge.evaluate.tasks as tasks

    made = []
    monkeypatch.setattr(tasks, "pipeline", lambda task, checkpoint, **options: made.append((task, checkpoint, options)) or pipe)
    return made


def test_evaluate_task_passes_its_options_to_the_pipeline(monkeypatch, tmp_path):
    data = tmp_path / "d.tsv"
    data.write_text("sentence\tlabel\ngood\t1\nbad\t0\n")
    made = _fake_pipeline(monkeypatch, _Pipe("classify", [{"label": "1"}, {"label": "1"}], labels=["0", "1"]))
    result = evaluate_task("ck", None, data, batch_size=4, max_answer_length=5, device="cpu", dtype="bfloat16")
    assert made == [(None, "ck", dict(device="cpu", batch_size=4, max_new_tokens=None, max_answer_length=5, num_beams=None,
                                      length_penalty=None, dtype="bfloat16"))]
    assert (result["task"], result["examples"], result["accuracy"]) == ("classify", 2, 50.0)
    with pytest.raises(UserError, match=r"^--limit must be >= 1, got 0$"):
        evaluate_task("ck", None, data, limit=0)
    assert evaluate_task("ck", None, data, limit=1)["accuracy"] == 100.0


def test_evaluate_task_scores_generated_text_with_each_metric(monkeypatch, tmp_path):
    from lmforge.evaluate.metrics import bleu, chrf, rouge

    src, tgt = tmp_path / "src.en", tmp_path / "tgt.de"
    src.write_text("a man rides a horse\ntwo dogs play\n")
    tgt.write_text("ein Mann reitet ein Pferd\nzwei Hunde spielen\n")
    hyps = ["ein Mann reitet ein Pferd", "zwei Katzen spielen im Garten"]
    _fake_pipeline(monkeypatch, _Pipe("seq2seq", hyps))
    result = evaluate_task("ck", "seq2seq", src, target=tgt)
    refs = [["ein Mann reitet ein Pferd"], ["zwei Hunde spielen"]]
    assert {k: result[k] for k in ("bleu", "chrf", "rouge1", "rouge2", "rougeL")} == {
        "bleu": bleu(hyps, refs), "chrf": chrf(hyps, refs), **rouge(hyps, refs)}
    assert result["bleu"] != result["chrf"]


def test_a_classifier_scored_on_labels_it_never_saw_is_refused(monkeypatch, tmp_path):
    data = tmp_path / "d.tsv"
    data.write_text("sentence\tlabel\ngood\tpos\nbad\tneg\n")
    _fake_pipeline(monkeypatch, _Pipe("classify", [{"label": "1"}, {"label": "0"}], labels=["0", "1"]))
    with pytest.raises(UserError, match=r"none of the labels in .*d.tsv \('neg', 'pos'\) is one the model was fine-tuned "
                                        r"with \('0', '1'\)"):
        evaluate_task("ck", "classify", data)


def test_a_checkpoint_tuned_for_sft_refuses_generation_options_when_its_task_is_implied(monkeypatch, tmp_path):
    made = _fake_pipeline(monkeypatch, _Pipe("sft", []))
    with pytest.raises(UserError, match=r"^--num-beams does not apply: eval --task sft scores the loss of the reference replies"):
        evaluate_task("ck", None, tmp_path / "chat.jsonl", num_beams=2)
    assert len(made) == 1  # the task was known only from the checkpoint
