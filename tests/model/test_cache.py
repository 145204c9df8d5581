"""Per-row positions: slots at different lengths decode in one batch exactly as each would alone."""

import pytest
import torch

from lmforge.config import preset
from lmforge.model import Transformer


@pytest.mark.parametrize("position", ["learned", "rotary", "sinusoidal"])
def test_slots_at_different_lengths_match_each_sequence_alone(position):
    torch.manual_seed(0)
    extra = dict(norm="rmsnorm", mlp="swiglu", n_kv_head=2) if position == "rotary" else {}
    model = Transformer(preset("tiny", vocab_size=97, context_length=32, position=position, **extra)).eval()
    prompts = [[5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9], [42]]
    cache = model.new_cache(batch_size=3, max_seq_len=24)
    with torch.no_grad():
        for slot, p in enumerate(prompts):  # prefill each slot alone, through a view of the batch cache
            model(torch.tensor([p]), cache=cache.rows(slot, slot + 1), start=0)
        nxt = torch.tensor([11, 12, 13])
        lengths = torch.tensor([len(p) for p in prompts])
        batched = model(nxt[:, None], cache=cache, start=lengths)[:, -1]  # (3, V)
        for b, p in enumerate(prompts):
            alone = model(torch.tensor([p + [int(nxt[b])]]))[0, -1]
            torch.testing.assert_close(batched[b], alone, rtol=1e-5, atol=1e-5)


def test_per_row_chunk_write_and_reorder():
    torch.manual_seed(0)
    model = Transformer(preset("tiny", vocab_size=50, context_length=16)).eval()
    cache = model.new_cache(batch_size=2, max_seq_len=16)
    with torch.no_grad():
        # Two tokens per row at different offsets, after a per-row prefix.
        model(torch.tensor([[1, 2, 3], [4, 5, 6]]), cache=cache, start=0)
        out = model(torch.tensor([[7, 8], [9, 10]]), cache=cache, start=torch.tensor([3, 3]))[:, -1]
        ref = model(torch.tensor([[1, 2, 3, 7, 8], [4, 5, 6, 9, 10]]))[:, -1]
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        k0 = torch.stack(cache.k)[:, 0].clone()
        cache.reorder(torch.tensor([1, 1]))
        k = torch.stack(cache.k)
        assert torch.equal(k[:, 0], k[:, 1]) and not torch.equal(k[:, 0], k0)


def test_a_view_bound_to_its_starts_gives_the_same_logits():
    """`rows(..., start=, T=)` works out the write index and mask once; the numbers are those of an unbound view."""
    torch.manual_seed(0)
    model = Transformer(preset("tiny", vocab_size=50, context_length=16)).eval()
    logits = []
    for bind in (False, True):
        cache = model.new_cache(batch_size=3, max_seq_len=16)
        with torch.no_grad():
            model(torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]]), cache=cache, start=0)
            start = torch.tensor([4, 2, 3])  # rows at different lengths (later keys are stale)
            view = cache.rows(0, 3, length=8, start=start if bind else None, T=2)
            if bind:
                assert view._per_row(start, 2)[0] is view._bound[2]
            logits.append(model(torch.tensor([[13, 14], [15, 16], [17, 18]]), cache=view, start=start))
    assert torch.equal(logits[0], logits[1])


def test_a_shorter_span_attends_over_fewer_keys_of_the_same_buffers():
    torch.manual_seed(0)
    model = Transformer(preset("tiny", vocab_size=50, context_length=32)).eval()
    cache = model.new_cache(batch_size=2, max_seq_len=32)
    short = cache.spanning(8)
    assert short.k is cache.k and short.v is cache.v and short.span == 8 and cache.span == 32
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]]), cache=cache, start=0)
        # Rows at different positions, one token each, through the 8-key span.
        k, v = short.update(0, torch.tensor([4, 2]), torch.ones(2, 4, 1, 16), torch.ones(2, 4, 1, 16))
        assert k.shape == v.shape == (2, 4, 8, 16) and short.attention_mask(torch.tensor([4, 2]), 1).shape == (2, 1, 1, 8)
        assert cache.k[0][0, :, 4].eq(1).all() and cache.k[0][1, :, 2].eq(1).all()  # written into the shared buffers
        model(torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]]), cache=cache, start=0)
        out = model(torch.tensor([[9], [10]]), cache=short, start=torch.tensor([4, 4]))[:, -1]
        ref = model(torch.tensor([[1, 2, 3, 4, 9], [5, 6, 7, 8, 10]]))[:, -1]
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
