"""BERT's objectives: the 80/10/10 masking rule and 50/50 next-sentence pairs."""

import numpy as np
import pytest

from lmforge.data.loader import TokenWindows
from lmforge.data.mlm import MaskingSpec, mask_tokens, mlm_batch
from lmforge.model.losses import IGNORE_INDEX as IGNORE

SPEC = MaskingSpec(cls_id=9001, sep_id=9002, mask_id=9003, vocab_size=9000, special_ids=(0, 9001, 9002, 9003))


def test_masking_statistics():
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 9000, size=400_000)
    ids[::50] = 0  # specials are never chosen
    inputs, labels = mask_tokens(ids, SPEC, rng)
    chosen = labels != IGNORE
    assert not chosen[::50].any()
    eligible = (ids != 0).sum()
    assert chosen.sum() / eligible == pytest.approx(0.15, abs=0.003)
    assert (labels[chosen] == ids[chosen]).all()  # the target is always the original token
    assert (inputs[~chosen] == ids[~chosen]).all()  # nothing else changes
    masked = (inputs[chosen] == SPEC.mask_id).mean()
    kept = (inputs[chosen] == ids[chosen]).mean()  # includes random draws that hit the original (1/9000)
    random = 1 - masked - kept
    assert masked == pytest.approx(0.8, abs=0.01)
    assert kept == pytest.approx(0.1, abs=0.01) and random == pytest.approx(0.1, abs=0.01)
    assert inputs[chosen & (inputs != SPEC.mask_id)].max() < 9000  # random replacements are real tokens
    # ... drawn uniformly from the whole vocabulary: ~5,800 draws from 9,000 ids hit ~4,300 distinct
    # ids (9000 * (1 - e^(-5800/9000))), with a mean of 4,500 +- 34.
    drawn = inputs[chosen & (inputs != SPEC.mask_id) & (inputs != ids)]
    assert len(np.unique(drawn)) > 3500 and drawn.mean() == pytest.approx(4500, abs=200)


def test_nsp_pairs_are_half_consecutive_half_random():
    stream = np.arange(1, 8001, dtype=np.int64)  # token i is followed by i + 1: continuity is checkable
    windows = TokenWindows([stream], seq_len=32)
    follows = []
    for step in range(40):
        b = mlm_batch(windows, SPEC, 16, seed=3, step=step, nsp=True)
        ids = np.where(b["labels"] != IGNORE, b["labels"], b["input_ids"])  # undo the masking
        a_len = (32 - 3) // 2
        assert (ids[:, 0] == SPEC.cls_id).all() and (ids[:, a_len + 1] == SPEC.sep_id).all() and (ids[:, -1] == SPEC.sep_id).all()
        types = b["token_type_ids"].numpy()
        assert (types[:, : a_len + 2] == 0).all() and (types[:, a_len + 2 :] == 1).all()
        a, rest = ids[:, 1 : a_len + 1], ids[:, a_len + 2 : -1]
        assert (np.diff(a, axis=1) == 1).all() and (np.diff(rest, axis=1) == 1).all()  # each segment is contiguous text
        consecutive = rest[:, 0] == a[:, -1] + 1
        assert (consecutive == (b["nsp_labels"].numpy() == 0)).all()  # label 0 exactly when B follows A
        follows.extend(consecutive.tolist())
    assert np.mean(follows) == pytest.approx(0.5, abs=0.06)


def test_batches_are_a_function_of_seed_and_step():
    windows = TokenWindows([np.arange(1, 5000, dtype=np.int64)], seq_len=16)
    a, b = (mlm_batch(windows, SPEC, 4, seed=1, step=7, nsp=True) for _ in range(2))
    assert all((a[k] == b[k]).all() for k in a)
    c = mlm_batch(windows, SPEC, 4, seed=1, step=8, nsp=True)
    assert not (a["input_ids"] == c["input_ids"]).all()


def test_random_segments_come_from_another_document():
    # Eight documents of 50 tokens; token d*100 + i is token i of document d, and 0 ends each document.
    stream = np.concatenate([np.append(d * 100 + np.arange(1, 51), 0) for d in range(1, 9)])
    spec = MaskingSpec(cls_id=9001, sep_id=9002, mask_id=9003, vocab_size=9000, special_ids=(0, 9001, 9002, 9003), eot_id=0)
    windows = TokenWindows([stream], seq_len=32)
    a_len, checked = (32 - 3) // 2, 0
    for step in range(40):
        b = mlm_batch(windows, spec, 16, seed=5, step=step, nsp=True)
        ids = np.where(b["labels"] != IGNORE, b["labels"], b["input_ids"])
        a_last, b_first = ids[:, a_len], ids[:, a_len + 2]
        for is_random, x, y in zip(b["nsp_labels"].tolist(), a_last, b_first):
            if is_random and x and y:  # an end-of-text token (0) names no document by itself
                assert x // 100 != y // 100
                checked += 1
    assert checked > 200
    # One document: nothing else to draw from, so B is a random span of it (and the batch is still made).
    one = TokenWindows([np.arange(1, 2000)], seq_len=32)
    labels = np.concatenate([mlm_batch(one, spec, 16, seed=5, step=s, nsp=True)["nsp_labels"].numpy() for s in range(10)])
    assert 0.3 < labels.mean() < 0.7
