"""`evaluate_task`: a fine-tuned checkpoint on a task's labelled data, scored by the field's metric.

    classify   accuracy, macro_f1                      tag   entity precision / recall / f1 (seqeval's)
    qa         exact_match, f1 (official SQuAD v1.1)    seq2seq  bleu, chrf (sacrebleu), rouge1/2/L (rouge-score)
    sft        loss and perplexity on the assistant turns
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch

from lmforge.data.features import TaskFormat, collate, featurize, read_examples
from lmforge.evaluate.metrics import accuracy, bleu, chrf, entity_f1, macro_f1, rouge, squad_scores
from lmforge.infer import pipeline
from lmforge.model.losses import IGNORE_INDEX, lm_loss
from lmforge.train import weighted_mean_loss
from lmforge.utils.errors import UserError


def _refuse_generation(options: dict[str, Any]) -> None:
    """eval --task sft scores the loss of the reference replies: the options of generation do not apply."""
    if unused := [name for name, value in options.items() if value is not None]:
        raise UserError(f"--{unused[0].replace('_', '-')} does not apply: eval --task sft scores the loss of the reference "
                        "replies and generates nothing (predict --task sft generates replies); leave it out")


def evaluate_task(
    checkpoint: str | Path,
    task: str | None,
    data: str | Path,
    *,
    target: str | Path | None = None,
    split_articles: float | None = None,
    text_field: str | None = None,
    label_field: str | None = None,
    limit: int | None = None,
    batch_size: int = 32,
    max_new_tokens: int | None = None,
    num_beams: int | None = None,
    length_penalty: float | None = None,
    max_answer_length: int | None = None,
    device: str = "auto",
    dtype: str = "auto",
) -> dict[str, Any]:
    """Score `checkpoint` on `data` for `task` (None: the task it was fine-tuned for).

    For QA, `split_articles` F scores the held-out articles (those after the first F, as
    `finetune --split-articles F` left out). A gold class or entity type the model was not fine-tuned
    with counts as a miss (as sklearn and seqeval count it); a file in which none is one of the
    model's is refused, being labelled for another model. `limit` scores only the first N examples. Generation
    options (`max_new_tokens`, `num_beams`, `length_penalty`) and `max_answer_length` are the
    pipeline's (`lmforge.pipeline`), and so is `dtype`.
    """
    t0 = time.perf_counter()
    generation = {"max_new_tokens": max_new_tokens, "num_beams": num_beams, "length_penalty": length_penalty}
    if task == "sft":  # before the pipeline's own checks of these options, which would ask for more of them
        _refuse_generation(generation)
    pipe = pipeline(task, checkpoint, device=device, batch_size=batch_size, max_new_tokens=max_new_tokens,
                    max_answer_length=max_answer_length, num_beams=num_beams, length_penalty=length_penalty, dtype=dtype)
    if task is None and pipe.task == "sft":  # the checkpoint's own task
        _refuse_generation(generation)
    task = pipe.task
    examples = read_examples(task, data, target, text_field=text_field, label_field=label_field,
                             split_articles=split_articles, part=1)
    if limit is not None:
        if limit < 1:
            raise UserError(f"--limit must be >= 1, got {limit}")
        examples = examples[:limit]
    if task in ("classify", "tag"):
        _check_labels_known(task, pipe.model.config.labels, examples, data)
    result: dict[str, Any] = {"task": task, "examples": len(examples)}
    if task == "classify":
        pred = [p["label"] for p in pipe([ex.text for ex in examples])]
        gold = [ex.label for ex in examples]
        result |= {"accuracy": accuracy(pred, gold), "macro_f1": macro_f1(pred, gold)}
    elif task == "tag":
        pred = [p["tags"] for p in pipe([ex.tokens for ex in examples])]
        result |= entity_f1(pred, [ex.tags for ex in examples])
    elif task == "qa":
        answers = pipe([{"question": ex.question, "context": ex.context} for ex in examples])
        result |= squad_scores({ex.id: a["answer"] for ex, a in zip(examples, answers)}, examples)
    elif task == "seq2seq":
        hyps = pipe([ex.source for ex in examples])
        refs = [ex.references for ex in examples]
        result |= {"bleu": bleu(hyps, refs), "chrf": chrf(hyps, refs), **rouge(hyps, refs)}
    else:
        loss = _assistant_loss(pipe.model, pipe.format, examples, batch_size)
        result |= {"loss": loss, "perplexity": math.exp(min(loss, 700.0))}
    result["seconds"] = time.perf_counter() - t0
    return result


def _check_labels_known(task: str, labels: list[str], examples: list, data: str | Path) -> None:
    """Refuse gold data none of whose classes (entity types, for tag) the model knows: it is
    labelled for another model or data set, and every example would score as a miss."""
    if task == "classify":
        gold, known, what = {ex.label for ex in examples}, set(labels), "labels"
    else:
        gold = {t[2:] for ex in examples for t in ex.tags if t != "O"}
        known, what = {t[2:] for t in labels if t != "O"}, "entity types"
    if gold and not gold & known:
        raise UserError(
            f"none of the {what} in {data} ({', '.join(map(repr, sorted(gold)))}) is one the model was fine-tuned with "
            f"({', '.join(map(repr, sorted(known)))}); score it on data labelled as its training data was"
        )


def _assistant_loss(model, fmt: TaskFormat, examples: list, batch_size: int) -> float:
    """Mean next-token loss (nats) over the assistant turns' tokens, as fine-tuning validates it."""
    features = featurize(fmt, "sft", examples)
    batches = [collate(features[i : i + batch_size], fmt.pad_id) for i in range(0, len(features), batch_size)]

    def n_predicted(batch: dict[str, torch.Tensor]) -> int:
        return int((batch["labels"] != IGNORE_INDEX).sum())

    def loss(m, batch: dict[str, torch.Tensor]) -> torch.Tensor:  # over the real vocabulary, as validation scores
        return lm_loss(m(batch["input_ids"]), batch["labels"], vocab_size=m.config.vocab_size)

    if sum(map(n_predicted, batches)) == 0:
        raise UserError("the conversations have no assistant tokens within the model's context; nothing to score")
    device = model.tok_embeddings.weight.device
    return weighted_mean_loss(loss, n_predicted, model, batches, device, None)
