"""Task metrics against the reference libraries' documented examples and hand-computed values."""

import random

import pytest
from conftest import SHARED_DATA

from lmforge.data.tasks import QAExample, read_squad
from lmforge.evaluate.metrics import (
    accuracy,
    bleu,
    chrf,
    entities,
    entity_f1,
    macro_f1,
    normalize_answer,
    rouge,
    squad_scores,
)

# --- classification ---------------------------------------------------------------------------


def test_accuracy_and_macro_f1_sklearn_doc_example():
    # sklearn's f1_score docstring: y_true=[0,1,2,0,1,2], y_pred=[0,2,1,0,0,1], average="macro" -> 0.26...
    # by hand: class 0 has tp=2 fp=1 fn=0 -> F1 = 4/5; classes 1 and 2 have tp=0 -> 0; mean = 4/15.
    gold, pred = [0, 1, 2, 0, 1, 2], [0, 2, 1, 0, 0, 1]
    assert macro_f1(pred, gold) == pytest.approx(100 * 4 / 15)
    assert accuracy(pred, gold) == pytest.approx(100 * 2 / 6)
    # A label only ever predicted still counts as a class (sklearn averages over gold | predicted).
    assert macro_f1(["a", "b"], ["a", "a"]) == pytest.approx(100 * (2 / 3 + 0) / 2)
    with pytest.raises(ValueError):
        accuracy([1], [1, 2])
    with pytest.raises(ValueError):
        macro_f1([], [])


def test_macro_f1_equals_sklearn():
    f1_score = pytest.importorskip("sklearn.metrics").f1_score
    rng = random.Random(0)
    for _ in range(20):
        n = rng.randint(1, 40)
        gold = [rng.choice("abcd") for _ in range(n)]
        pred = [rng.choice("abcde") for _ in range(n)]
        assert macro_f1(pred, gold) == pytest.approx(100 * f1_score(gold, pred, average="macro", zero_division=0))


# --- entities -----------------------------------------------------------------------------------

SEQEVAL_TRUE = [["O", "O", "O", "B-MISC", "I-MISC", "I-MISC", "O"], ["B-PER", "I-PER", "O"]]
SEQEVAL_PRED = [["O", "O", "B-MISC", "I-MISC", "I-MISC", "I-MISC", "O"], ["B-PER", "I-PER", "O"]]


def test_entity_f1_seqeval_readme_and_hand_cases():
    # seqeval's README: f1_score(y_true, y_pred) == 0.50 (the MISC span is off by one token).
    assert entity_f1(SEQEVAL_PRED, SEQEVAL_TRUE) == pytest.approx({"precision": 50.0, "recall": 50.0, "f1": 50.0})
    assert entities(["B-PER", "I-PER", "O", "B-LOC"]) == [("PER", 0, 1), ("LOC", 3, 3)]  # get_entities docstring
    # An I- after O opens an entity (conlleval), so this prediction is right on both.
    gold = [["B-PER", "I-PER", "O", "B-LOC"]]
    assert entity_f1([["B-PER", "I-PER", "O", "I-LOC"]], gold)["f1"] == 100.0
    # PER cut short is wrong, LOC right; one extra ORG: P = 1/3, R = 1/2, F1 = 2/5.
    scores = entity_f1([["B-PER", "O", "B-ORG", "B-LOC"]], gold)
    assert scores == pytest.approx({"precision": 100 / 3, "recall": 50.0, "f1": 40.0})
    # A type change inside a span splits it: B-PER I-LOC is two entities.
    assert entities(["B-PER", "I-LOC"]) == [("PER", 0, 0), ("LOC", 1, 1)]
    assert entity_f1([["O"]], [["O"]]) == {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    with pytest.raises(ValueError):
        entity_f1([["O", "O"]], [["O"]])


def test_entity_f1_equals_seqeval_on_random_tags():
    metrics = pytest.importorskip("seqeval.metrics")
    from seqeval.metrics.sequence_labeling import get_entities

    rng = random.Random(0)
    tags = ["O", "O", "O", "B-PER", "I-PER", "B-LOC", "I-LOC", "I-ORG", "E-PER", "S-LOC"]
    gold = [[rng.choice(tags) for _ in range(rng.randint(1, 12))] for _ in range(300)]
    pred = [[t if rng.random() < 0.6 else rng.choice(tags) for t in sentence] for sentence in gold]
    for sentence in gold + pred:
        assert entities(sentence) == get_entities(sentence)
    ours = entity_f1(pred, gold)
    assert ours["precision"] == pytest.approx(100 * metrics.precision_score(gold, pred))
    assert ours["recall"] == pytest.approx(100 * metrics.recall_score(gold, pred))
    assert ours["f1"] == pytest.approx(100 * metrics.f1_score(gold, pred))
    assert 0 < ours["f1"] < 100


# --- extractive QA ------------------------------------------------------------------------------


def qa(qid: str, *answers: str) -> QAExample:
    return QAExample(qid, "T", "context", "question?", [(a, 0) for a in answers], f"test: question {qid}")


def test_normalize_answer_as_squad_v11():
    assert normalize_answer("The  Quick, brown fox!") == "quick brown fox"
    assert normalize_answer("An apple a day") == "apple day"
    assert normalize_answer("Theatre") == "theatre"  # articles only as whole words
    assert normalize_answer("Levi's") == "levis"  # punctuation is deleted, not replaced by a space
    assert normalize_answer("the-end") == "theend"  # so this is no longer an article


def test_squad_scores_hand_computed():
    examples = [
        qa("1", "Broncos", "The Denver Broncos"),
        qa("2", "Denver Broncos"),
        qa("3", "Santa Clara, California", "Levi's Stadium"),
        qa("4", "Super Bowl 50"),
    ]
    predictions = {"1": "the Denver Broncos!", "2": "Broncos of Denver", "3": "Levi's Stadium in Santa Clara", "x": "?"}
    # 1: exact after normalisation, to the second gold answer (the max over golds). 2: 2 common of 3 predicted / 2 gold -> F1 = 0.8.
    # 3: vs "levis stadium" P = 2/5, R = 1 -> 4/7; vs "santa clara california" P = 2/5, R = 2/3 -> 1/2; max 4/7.
    # 4: no prediction -> 0, still counted.
    with pytest.warns(UserWarning, match="1 of 4 questions have no prediction"):
        scores = squad_scores(predictions, examples)
    assert scores["exact_match"] == pytest.approx(25.0)
    assert scores["f1"] == pytest.approx(100 * (1 + 0.8 + 4 / 7 + 0) / 4)


def test_squad_scores_on_xquad():
    examples = read_squad(SHARED_DATA / "qa" / "xquad" / "xquad.en.json")
    gold = {e.id: e.answers[0][0] for e in examples}
    assert squad_scores(gold, examples) == {"exact_match": 100.0, "f1": 100.0}
    wrong = {e.id: "zzz" for e in examples}
    assert squad_scores(wrong, examples) == {"exact_match": 0.0, "f1": 0.0}


# --- generation ---------------------------------------------------------------------------------

# sacrebleu's README: two reference streams for three system outputs.
README_REFS = [
    ["The dog bit the man.", "It was not unexpected.", "The man bit him first."],
    ["The dog had bit the man.", "No one was surprised.", "The man had bitten the dog."],
]
README_SYS = ["The dog bit the man.", "It wasn't surprising.", "The man had just bitten him."]


def test_bleu_and_chrf_sacrebleu_readme():
    per_hypothesis = [list(refs) for refs in zip(*README_REFS)]  # our refs are per hypothesis
    assert round(bleu(README_SYS, per_hypothesis), 2) == 48.53  # README: BLEU = 48.53 82.4/50.0/45.5/37.5
    assert round(chrf(README_SYS, per_hypothesis), 2) == 59.73  # README: chrF2 = 59.73
    assert bleu(README_SYS, README_SYS) == pytest.approx(100.0)
    assert chrf(README_SYS, README_SYS) == pytest.approx(100.0)


def test_bleu_single_and_variable_references():
    from sacrebleu.metrics import BLEU

    single = bleu(README_SYS, README_REFS[0])
    assert single == pytest.approx(BLEU().corpus_score(README_SYS, [README_REFS[0]]).score)
    # Only the last hypothesis has a second reference: sacrebleu takes None as "no reference here".
    ragged = [[README_REFS[0][0]], [README_REFS[0][1]], [README_REFS[0][2], README_REFS[1][2]]]
    streams = [README_REFS[0], [None, None, README_REFS[1][2]]]
    assert bleu(README_SYS, ragged) == pytest.approx(BLEU().corpus_score(README_SYS, streams).score)
    assert single < bleu(README_SYS, ragged)  # "The man had bitten the dog." shares "the man had ... bitten"
    # A short hypothesis with one reference: a padded "" would be a closer reference length than the real one.
    hyps, refs = ["The dog", "It was not unexpected."], [["The dog bit the man."], ["It was not unexpected.", "No one was."]]
    streams = [["The dog bit the man.", "It was not unexpected."], [None, "No one was."]]
    assert bleu(hyps, refs) == pytest.approx(BLEU().corpus_score(hyps, streams).score)
    with pytest.raises(ValueError):
        bleu(README_SYS, README_REFS)  # two streams for three hypotheses: not per-hypothesis references


def test_rouge_hand_computed():
    # rouge-score's README pair. Lowercased, stemmed tokens:
    #   target     the quick brown fox jump over the lazi dog   (9)
    #   prediction the quick brown dog jump on the log          (8)
    # ROUGE-1: 6 common -> P 6/8, R 6/9; ROUGE-2: {the quick, quick brown} -> P 2/7, R 2/8;
    # ROUGE-L: LCS "the quick brown jump the" = 5 -> P 5/8, R 5/9.
    def f(p, r):
        return 100 * 2 * p * r / (p + r)

    scores = rouge(["The quick brown dog jumps on the log."], ["The quick brown fox jumps over the lazy dog"])
    assert scores == pytest.approx({"rouge1": f(6 / 8, 6 / 9), "rouge2": f(2 / 7, 2 / 8), "rougeL": f(5 / 8, 5 / 9)})
    assert rouge(["he jumped"], ["He jumps"])["rouge2"] == pytest.approx(100.0)  # Porter stemming on


def test_rouge_multi_reference_takes_the_best_rouge1_reference():
    hyp = "the cat sat on the mat"
    shuffled, prefix = "mat the on sat cat the", "the cat sat"
    # shuffled: ROUGE-1 1.0, ROUGE-2 0, ROUGE-L 3/6. prefix: ROUGE-1 2/3, ROUGE-2 4/7, ROUGE-L 2/3.
    # SciTLDR's multi-max keeps all three scores of the best ROUGE-1 reference (not a max per score).
    assert rouge([hyp], [[prefix, shuffled]]) == pytest.approx({"rouge1": 100.0, "rouge2": 0.0, "rougeL": 50.0})
    # Averaged over examples.
    two = rouge([hyp, hyp], [[prefix], [shuffled]])
    assert two == pytest.approx({"rouge1": (200 / 3 + 100) / 2, "rouge2": 400 / 7 / 2, "rougeL": (200 / 3 + 50) / 2})
