"""The chunked cross-entropy against the plain one (logits for the whole batch), and bits per byte."""

import math

import pytest
import torch

from lmforge.model.losses import IGNORE_INDEX, bits_per_byte, chunked_lm_loss, lm_loss


@pytest.mark.parametrize("chunk", [1, 7, 24, 1000])
def test_chunked_loss_and_gradients_equal_plain(chunk):
    torch.manual_seed(0)
    B, T, C, V = 3, 8, 16, 50
    h = torch.randn(B, T, C, requires_grad=True)
    w = torch.randn(V, C, requires_grad=True)
    y = torch.randint(0, V, (B, T))
    y[0, :3] = IGNORE_INDEX  # ignored positions carry neither loss nor gradient
    h2, w2 = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    plain = lm_loss(h @ w.T, y)
    chunked = chunked_lm_loss(h2, w2, y, chunk)
    assert abs(plain.item() - chunked.item()) < 1e-6
    (2.5 * plain).backward()
    (2.5 * chunked).backward()
    torch.testing.assert_close(h2.grad, h.grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(w2.grad, w.grad, atol=1e-6, rtol=1e-5)


def test_chunked_loss_without_grad_and_in_float64():
    torch.manual_seed(0)
    h, w, y = torch.randn(2, 5, 8, dtype=torch.float64), torch.randn(30, 8, dtype=torch.float64), torch.randint(0, 30, (2, 5))
    with torch.no_grad():
        got = chunked_lm_loss(h, w, y, 3)
    want = torch.nn.functional.cross_entropy((h @ w.T).flatten(0, 1), y.flatten())
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=0)  # the loss is accumulated in fp32


def test_chunked_loss_under_bf16_autocast_matches_plain():
    torch.manual_seed(0)
    h, w, y = torch.randn(2, 6, 16), torch.randn(40, 16, requires_grad=True), torch.randint(0, 40, (2, 6))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = lm_loss(torch.nn.functional.linear(h, w), y)
        chunked = chunked_lm_loss(h, w, y, 5)
    assert abs(plain.item() - chunked.item()) < 1e-3  # both take the head's matmul in bf16
    (gw,) = torch.autograd.grad(chunked, w)
    assert gw.dtype == torch.float32 and torch.isfinite(gw).all()


def test_label_smoothing_is_the_mixed_target_cross_entropy():
    torch.manual_seed(0)
    logits, y = torch.randn(2, 5, 11), torch.randint(0, 11, (2, 5))
    y[1, 4] = IGNORE_INDEX
    logp = logits.log_softmax(-1).flatten(0, 1)
    keep = y.flatten() != IGNORE_INDEX
    target = torch.full_like(logp, 0.1 / 11)
    target[keep.nonzero().squeeze(1), y.flatten()[keep]] += 0.9
    want = -(target * logp).sum(-1)[keep].mean()
    torch.testing.assert_close(lm_loss(logits, y, label_smoothing=0.1), want)
    assert lm_loss(logits, y, label_smoothing=0.1) > lm_loss(logits, y)


@pytest.mark.parametrize("chunk", [4, 1000])
def test_chunked_loss_with_label_smoothing_equals_plain(chunk):
    torch.manual_seed(1)
    h, w, y = torch.randn(2, 7, 16, requires_grad=True), torch.randn(30, 16, requires_grad=True), torch.randint(0, 30, (2, 7))
    y[0, :2] = IGNORE_INDEX
    plain = lm_loss(h @ w.T, y, label_smoothing=0.2)
    h2, w2 = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    chunked = chunked_lm_loss(h2, w2, y, chunk, label_smoothing=0.2)
    assert abs(plain.item() - chunked.item()) < 1e-5
    plain.backward()
    chunked.backward()
    torch.testing.assert_close(h2.grad, h.grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(w2.grad, w.grad, atol=1e-6, rtol=1e-5)


def _count_matmuls(fn):
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default)
            return func(*args, **(kwargs or {}))

    with Count():
        out = fn()
    return out, Count.n


def test_chunked_loss_under_no_grad_does_no_gradient_work():
    # Validation runs under no_grad with the head's Parameter: one matmul per chunk, the loss only.
    torch.manual_seed(0)
    h, w, y = torch.randn(2, 6, 16), torch.nn.Parameter(torch.randn(40, 16)), torch.randint(0, 40, (2, 6))
    with torch.no_grad():
        got, matmuls = _count_matmuls(lambda: chunked_lm_loss(h, w, y, 4))  # 3 chunks
        want = lm_loss(h @ w.T, y)
    assert matmuls == 3
    torch.testing.assert_close(got, want)
    # Training is unchanged: the weight gradient is made in the forward, a second matmul per chunk.
    loss, matmuls = _count_matmuls(lambda: chunked_lm_loss(h, w, y, 4))
    assert matmuls == 6
    loss.backward()
    (want_gw,) = torch.autograd.grad(lm_loss(h @ w.T, y), w)
    torch.testing.assert_close(w.grad, want_gw)


def test_label_smoothing_spreads_over_the_real_vocabulary_not_the_padding():
    """Logits padded from 11 to 16 classes (padded_vocab_size): `vocab_size` keeps the padding ids out,
    as torch's smoothed cross-entropy on the sliced logits does; the padded rows of the head get no gradient."""
    torch.manual_seed(0)
    V, P = 11, 16
    h, w, y = torch.randn(2, 5, 8, requires_grad=True), torch.randn(P, 8, requires_grad=True), torch.randint(0, V, (2, 5))
    y[1, 3:] = IGNORE_INDEX
    want = torch.nn.functional.cross_entropy((h @ w.T)[..., :V].flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX,
                                             label_smoothing=0.1)
    (want_gh, want_gw) = torch.autograd.grad(want, (h, w))
    got = lm_loss(h @ w.T, y, label_smoothing=0.1, vocab_size=V)
    torch.testing.assert_close(got, want)
    assert abs(lm_loss(h @ w.T, y, label_smoothing=0.1) - want) > 1e-3  # over all 16 logits: another loss
    for chunk in (3, 1000):
        h2, w2 = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
        chunked = chunked_lm_loss(h2, w2, y, chunk, label_smoothing=0.1, vocab_size=V)
        chunked.backward()
        torch.testing.assert_close(chunked, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(h2.grad, want_gh, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(w2.grad, want_gw, atol=1e-6, rtol=1e-5)
        assert not w2.grad[V:].any()


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_a_batch_without_targets_has_loss_zero_and_no_gradient(smoothing):
    """An SFT batch whose replies all lie past max_length (or an MLM batch with nothing masked):
    0 over 0 targets would be nan, and nan times a share of 0 is still nan."""
    torch.manual_seed(0)
    h, w = torch.randn(2, 4, 8, requires_grad=True), torch.randn(20, 8, requires_grad=True)
    y = torch.full((2, 4), IGNORE_INDEX)
    plain = lm_loss(h @ w.T, y, label_smoothing=smoothing)
    chunked = chunked_lm_loss(h, w, y, 3, label_smoothing=smoothing)
    for loss in (plain, chunked):
        assert loss.item() == 0.0
        gh, gw = torch.autograd.grad(loss, (h, w))
        assert not gh.any() and not gw.any()
    with torch.no_grad():
        assert chunked_lm_loss(h, w, y, 3).item() == 0.0


def test_bits_per_byte_is_the_texts_total_bits_over_its_bytes():
    assert bits_per_byte(math.log(2), 10, 10) == pytest.approx(1.0)  # one bit per token, a byte per token
    assert bits_per_byte(2.0, 6, 4) == pytest.approx(12 / math.log(2) / 4)  # 12 nats over 4 bytes
