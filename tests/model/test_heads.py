import torch

from lmforge.config import preset
from lmforge.model import Transformer


def test_decoder_classify_reads_the_last_real_token_whatever_the_padding():
    torch.manual_seed(0)
    m = Transformer(preset("tiny").replace(vocab_size=50, task_head="classify", labels=["neg", "pos", "neu"])).eval()
    a, b = torch.randint(1, 50, (5,)), torch.randint(1, 50, (3,))
    batch = torch.zeros(2, 5, dtype=torch.long)
    batch[0], batch[1, :3] = a, b
    mask = torch.tensor([[1] * 5, [1, 1, 1, 0, 0]])
    out = m.task_logits(batch, mask)
    assert out.shape == (2, 3)
    torch.testing.assert_close(out[0], m.task_logits(a[None])[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1], m.task_logits(b[None])[0], atol=1e-5, rtol=1e-5)
    # The reference by hand: the head on the final hidden state of the last real token.
    torch.testing.assert_close(out[1], m.head(m.encode(b[None])[0, -1]), atol=1e-5, rtol=1e-5)
    # Left padding, as decoders are often batched (seen in review: the head read the first real token).
    # Rotary positions are relative, so the padded row equals the row alone.
    rotary = Transformer(preset("tiny").replace(vocab_size=50, task_head="classify", labels=["neg", "pos"],
                                                position="rotary")).eval()
    left = torch.zeros(2, 5, dtype=torch.long)
    left[0], left[1, 2:] = a, b
    out = rotary.task_logits(left, torch.tensor([[1] * 5, [0, 0, 1, 1, 1]]))
    torch.testing.assert_close(out[1], rotary.task_logits(b[None])[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[0], rotary.task_logits(a[None])[0], atol=1e-5, rtol=1e-5)


def test_encoder_classify_uses_the_pooled_cls_state_and_tag_span_heads_are_per_token():
    torch.manual_seed(0)
    cfg = preset("tiny").replace(vocab_size=50, arch="encoder", type_vocab_size=2, norm_position="post", embed_norm=True)
    x = torch.randint(1, 50, (2, 6))
    cls = Transformer(cfg.replace(task_head="classify", labels=["a", "b"])).eval()
    torch.testing.assert_close(cls.task_logits(x), cls.head(cls.pooler(cls.encode(x))))
    tag = Transformer(cfg.replace(task_head="tag", labels=["O", "B-x", "I-x"])).eval()
    assert tag.task_logits(x).shape == (2, 6, 3)
    span = Transformer(cfg.replace(task_head="span")).eval()
    assert span.task_logits(x).shape == (2, 6, 2)
