import threading

import numpy as np
import pytest
import torch

from lmforge.data.loader import Prefetcher, TokenWindows


def test_prefetcher_gives_the_batches_in_order_and_raises_errors():
    made = []

    def make(step, micro):
        made.append(threading.current_thread().name)
        if step == 3:
            raise ValueError("bad shard")
        return {"x": torch.tensor([step, micro])}

    keys = [(s, m) for s in range(4) for m in range(2)]
    p = Prefetcher(make, keys, depth=2)
    for key in keys[:6]:
        assert p.next(key)["x"].tolist() == list(key)
    with pytest.raises(ValueError, match="bad shard"):
        p.next(keys[6])
    p.close()
    assert set(made) == {"lmforge-prefetch"}


def test_prefetched_batches_equal_direct_ones():
    windows = TokenWindows([np.arange(1000, dtype=np.uint16)], 16)
    keys = [(s, m) for s in range(5) for m in range(3)]
    p = Prefetcher(lambda s, m: dict(zip("xy", windows.random_batch(4, 9, s, m))), keys, depth=3)
    for s, m in keys:
        x, y = windows.random_batch(4, 9, s, m)
        got = p.next((s, m))
        assert torch.equal(got["x"], x) and torch.equal(got["y"], y)
    p.close()


def test_closing_early_stops_the_thread():
    p = Prefetcher(lambda s: {"x": torch.tensor(s)}, ((s,) for s in range(10**9)), depth=2)
    assert p.next((0,))["x"].item() == 0
    p.close()
    assert not p._thread.is_alive()


def test_document_ids_follow_the_end_of_text_tokens_across_shards():
    eot = 0
    # shard 0: documents [5 6 0] [7 8 9 0] [4 4 ...; shard 1: [1 2 3 0] [1 1 ...
    shards = [np.array([5, 6, 0, 7, 8, 9, 0, 4, 4, 4, 4]), np.array([1, 2, 3, 0, 1, 1, 1, 1])]
    w = TokenWindows(shards, seq_len=2)
    starts = np.arange(w.num_windows)  # shard 0 windows start at 0..8, shard 1 at 0..5
    expected_first = [0, 0, 0, 1, 1, 1, 1, 2, 2, 3, 3, 3, 3, 4, 4]
    assert w.document_ids(starts, eot).tolist() == expected_first
    # The token one place into each window: an end-of-text token belongs to the document it ends.
    assert w.document_ids(starts, eot, offset=1).tolist() == [0, 0, 1, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4]
    # Chunked search finds the same positions as a whole-array one.
    from lmforge.data.loader import _positions_of

    tokens = np.random.default_rng(0).integers(0, 5, size=1000)
    assert (_positions_of(tokens, 3, chunk=7) == np.flatnonzero(tokens == 3)).all()
