"""Task metrics, as each community reports them: percentages in [0, 100], from plain Python lists.

    classification   accuracy, macro_f1                  (sklearn's f1_score(average="macro"))
    tagging          entity_f1                           (seqeval's default, conlleval-compatible mode)
    extractive QA    squad_scores                        (the official SQuAD v1.1 evaluation script)
    translation      bleu, chrf                          (sacrebleu, corpus level)
    summarization    rouge                               (rouge-score with stemming; SciTLDR's multi-reference max)

The generation metrics call the reference libraries themselves, because a BLEU that differs from
sacrebleu's in the second decimal is not BLEU (Post, 2018, https://aclanthology.org/W18-6319).
"""

from __future__ import annotations

import re
import string
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence

from lmforge.data.tasks import QAExample, entities


def accuracy(pred: Sequence, gold: Sequence) -> float:
    """Percentage of positions where `pred` equals `gold`."""
    _same_length(pred, gold)
    return 100.0 * sum(p == g for p, g in zip(pred, gold)) / len(gold)


def macro_f1(pred: Sequence, gold: Sequence) -> float:
    """Unweighted mean of per-class F1 over every label that is gold or predicted, as
    `sklearn.metrics.f1_score(gold, pred, average="macro")`: a class never predicted scores 0."""
    _same_length(pred, gold)
    tp, fp, fn = Counter(), Counter(), Counter()
    for p, g in zip(pred, gold):
        if p == g:
            tp[g] += 1
        else:
            fp[p] += 1
            fn[g] += 1
    classes = set(pred) | set(gold)
    # F1 = 2PR / (P + R) = 2tp / (2tp + fp + fn), which is 0 (not undefined) whenever tp is 0.
    return 100.0 * sum(2 * tp[c] / (2 * tp[c] + fp[c] + fn[c]) for c in classes) / len(classes)


# --- entities -----------------------------------------------------------------------------------
# seqeval's default mode is computed here (chunking by `lmforge.data.tasks.entities`) rather than imported: seqeval loads scikit-learn at import
# time (for its classification report), ships no wheel and has had no release since 2020, while the
# chunking rules are 20 lines. tests/evaluate/test_metrics.py checks equality with seqeval itself on
# its README example and on random tag sequences.


def entity_f1(pred_tags: Sequence[Sequence[str]], gold_tags: Sequence[Sequence[str]]) -> dict[str, float]:
    """Entity-level micro precision, recall and F1 over sentences of IOB2 tags: an entity counts
    only if its type and both boundaries match. Chunking is conlleval's (seqeval's default mode), so
    an I-X after O or after another type starts a new entity rather than being dropped."""
    if len(pred_tags) != len(gold_tags):
        raise ValueError(f"{len(pred_tags)} predicted sentences but {len(gold_tags)} gold ones")
    n_pred = n_gold = n_correct = 0
    for i, (pred, gold) in enumerate(zip(pred_tags, gold_tags)):
        if len(pred) != len(gold):
            raise ValueError(f"sentence {i}: {len(pred)} predicted tags but {len(gold)} gold tags")
        p, g = set(entities(pred)), set(entities(gold))
        n_pred, n_gold, n_correct = n_pred + len(p), n_gold + len(g), n_correct + len(p & g)
    precision = n_correct / n_pred if n_pred else 0.0
    recall = n_correct / n_gold if n_gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": 100.0 * precision, "recall": 100.0 * recall, "f1": 100.0 * f1}


# --- extractive QA ------------------------------------------------------------------------------


def squad_scores(predictions: Mapping[str, str], examples: Sequence[QAExample]) -> dict[str, float]:
    """Exact match and token F1 of predicted answer strings, each the max over a question's gold
    answers, as the official SQuAD v1.1 script (`evaluate-v1.1.py`) computes them. A question with no
    prediction scores 0 and counts, as there; predictions for unknown ids are ignored."""
    if not examples:
        raise ValueError("no examples to score")
    em = f1 = 0.0
    missing = 0
    for ex in examples:
        if ex.id not in predictions:
            missing += 1
            continue
        golds = [text for text, _ in ex.answers]
        em += max(normalize_answer(predictions[ex.id]) == normalize_answer(g) for g in golds)
        f1 += max(_token_f1(predictions[ex.id], g) for g in golds)
    if missing:
        warnings.warn(f"{missing} of {len(examples)} questions have no prediction; they score 0", stacklevel=2)
    return {"exact_match": 100.0 * em / len(examples), "f1": 100.0 * f1 / len(examples)}


_PUNCTUATION = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(s: str) -> str:
    """SQuAD v1.1's normalisation: lowercase, drop ASCII punctuation, drop a/an/the, squeeze spaces."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", s).split())


def _token_f1(prediction: str, gold: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    same = sum((Counter(pred) & Counter(ref)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


# --- generation ---------------------------------------------------------------------------------

References = Sequence[str] | Sequence[Sequence[str]]


def bleu(hyps: Sequence[str], refs: References) -> float:
    """Corpus BLEU with sacrebleu's defaults (13a tokenisation, 4-grams, exponential smoothing).

    `refs[i]` is the reference of `hyps[i]`, or a list of its references (the count may vary)."""
    from sacrebleu.metrics import BLEU

    return float(BLEU().corpus_score(list(hyps), _ref_streams(hyps, refs)).score)


def chrf(hyps: Sequence[str], refs: References) -> float:
    """Corpus chrF (character 6-grams, beta 2) of sacrebleu's defaults; `refs` as for `bleu`."""
    from sacrebleu.metrics import CHRF

    return float(CHRF().corpus_score(list(hyps), _ref_streams(hyps, refs)).score)


def rouge(hyps: Sequence[str], refs: References) -> dict[str, float]:
    """ROUGE-1, ROUGE-2 and ROUGE-L F-measure x 100 (rouge-score, Porter stemming), averaged over examples.

    With several references an example is scored against the one with the highest ROUGE-1 F, and its
    ROUGE-2 and ROUGE-L are that reference's too, as SciTLDR's multi-target evaluation does
    (https://github.com/allenai/scitldr/blob/master/scripts/cal-rouge.py, "multi-max"). rouge-score's
    tokenizer keeps only [a-z0-9], so the scores are for English text.
    """
    from rouge_score.rouge_scorer import RougeScorer

    keys = ("rouge1", "rouge2", "rougeL")
    scorer = RougeScorer(list(keys), use_stemmer=True)
    totals = dict.fromkeys(keys, 0.0)
    for hyp, references in zip(hyps, _ref_lists(hyps, refs)):
        best = max((scorer.score(ref, hyp) for ref in references), key=lambda s: s["rouge1"].fmeasure)
        for k in keys:
            totals[k] += best[k].fmeasure
    return {k: 100.0 * v / len(hyps) for k, v in totals.items()}


def _ref_lists(hyps: Sequence[str], refs: References) -> list[list[str]]:
    """`refs` as one non-empty list of reference strings per hypothesis."""
    if isinstance(refs, str) or len(refs) != len(hyps):
        raise ValueError(f"{len(hyps)} hypotheses need as many references (or reference lists), not {len(refs)}")
    if not hyps:
        raise ValueError("no hypotheses to score")
    out = [[r] if isinstance(r, str) else list(r) for r in refs]
    for i, rs in enumerate(out):
        if not rs or not all(isinstance(r, str) for r in rs):
            raise ValueError(f"references of hypothesis {i} must be a string or a non-empty list of strings")
    return out


def _ref_streams(hyps: Sequence[str], refs: References) -> list[list[str | None]]:
    """Per-hypothesis reference lists turned into sacrebleu's reference streams (stream k holds every
    hypothesis' k-th reference); None pads a hypothesis with fewer, which sacrebleu skips."""
    lists = _ref_lists(hyps, refs)
    width = max(map(len, lists))
    return [[rs[k] if k < len(rs) else None for rs in lists] for k in range(width)]


def _same_length(pred: Sequence, gold: Sequence) -> None:
    if len(pred) != len(gold):
        raise ValueError(f"{len(pred)} predictions but {len(gold)} gold labels")
    if not gold:
        raise ValueError("no examples to score")
