import pytest

from lmforge.config import preset
from lmforge.model import Transformer
from lmforge.scaling import flops
from lmforge.scaling.counting import chinchilla_forward_flops
from lmforge.utils.errors import UserError


def test_tiny_config_by_hand():
    # tiny: 2 layers, 4 heads, d_model 64, ffw 256, context 64; vocab 100 is padded to 128.
    cfg = preset("tiny", vocab_size=100)
    out = flops(cfg, tokens=1e6)

    block = (64 + 64) * 2 + (64 * 192 + 192) + (64 * 64 + 64) + (64 * 256 + 256) + (256 * 64 + 64)  # 49_984
    assert out["params"] == 128 * 64 + 64 * 64 + 2 * block + 2 * 64 == 112_384  # tok, pos, blocks, final norm
    assert out["params_no_embed"] == 2 * block + 2 * 64 == 100_096
    assert out["params"] == Transformer(cfg).num_params(exclude_positions=False)
    # 6·N·D both ways: N every parameter (what the sweep's `flops` and `plan` use), and Kaplan's N.
    assert out["flops_6nd"] == 6 * 112_384 * 1e6 and out["flops_6nd_no_embed"] == 6 * 100_096 * 1e6

    # Hoffmann et al. 2022, appendix F, one sequence of 64 tokens:
    embeddings = 2 * 64 * 128 * 64  # 1_048_576
    attention = (
        2 * 3 * 64 * 64 * 64  # QKV                 1_572_864
        + 2 * 64 * 64 * 64  # K @ Q logits          524_288
        + 3 * 4 * 64 * 64  # softmax                 49_152
        + 2 * 64 * 64 * 64  # softmax @ V           524_288
        + 2 * 64 * 64 * 64  # final linear          524_288
    )
    assert attention == 3_194_880
    dense = 2 * 64 * (64 * 256 + 64 * 256)  # 4_194_304
    logits = 2 * 64 * 64 * 128  # 1_048_576
    forward = embeddings + 2 * (attention + dense) + logits
    assert forward == 16_875_520
    assert out["flops_per_token_chinchilla"] == 3 * forward / 64 == 791_040
    assert out["flops_chinchilla"] == 791_040 * 1e6


def test_grouped_query_attention_and_swiglu_by_hand():
    """Appendix F generalised: K/V projections at n_kv_heads, three SwiGLU matrices (Llama-style blocks)."""
    # tiny, Llama-style: 2 layers, 4 query heads of 16, 2 key/value heads, d_model 64, SwiGLU hidden 256,
    # rotary (no position parameters), RMSNorm, no biases; vocab 100 padded to 128.
    cfg = preset("tiny", vocab_size=100, mlp="swiglu", n_kv_head=2, bias=False, norm="rmsnorm", position="rotary")
    out = flops(cfg, tokens=1e6)

    block = 2 * 64 + 64 * (4 + 2 * 2) * 16 + 64 * 64 + 64 * 2 * 256 + 256 * 64  # norms, qkv, proj, gate+up, down
    assert block == 61_568
    assert out["params"] == 128 * 64 + 2 * block + 64 == 131_392 == Transformer(cfg).num_params()
    assert out["params_no_embed"] == 2 * block + 64 == 123_200

    seq, d, V = 64, 64, 128
    attention = (
        2 * seq * d * (4 * 16)  # Q: 4 heads              524_288
        + 2 * 2 * seq * d * (2 * 16)  # K and V: 2 heads    524_288 (MHA would be 1_048_576)
        + 2 * seq * seq * (4 * 16)  # K @ Q logits       524_288
        + 3 * 4 * seq * seq  # softmax                      49_152
        + 2 * seq * seq * (4 * 16)  # softmax @ V        524_288
        + 2 * seq * (4 * 16) * d  # final linear         524_288
    )
    assert attention == 2_670_592
    dense = 2 * seq * 3 * d * 256  # gate, up and down: 6_291_456 (two matrices would be 4_194_304)
    forward = 2 * seq * V * d + 2 * (attention + dense) + 2 * seq * d * V
    assert forward == 20_021_248
    assert out["flops_per_token_chinchilla"] == 3 * forward / seq == 938_496
    assert out["flops_chinchilla"] == 938_496 * 1e6


def test_sequence_length_changes_only_the_attention_terms():
    cfg = preset("tiny", vocab_size=100)
    out = flops(cfg, tokens=1.0, seq_len=32)
    attention = 2 * 3 * 32 * 64 * 64 + 2 * 32 * 32 * 64 + 3 * 4 * 32 * 32 + 2 * 32 * 32 * 64 + 2 * 32 * 64 * 64
    forward = 2 * 32 * 128 * 64 + 2 * (attention + 2 * 32 * 2 * 64 * 256) + 2 * 32 * 64 * 128
    assert forward == 7_888_896
    assert out["flops_per_token_chinchilla"] == 3 * forward / 32 == 739_584
    assert out["params"] == flops(cfg, tokens=1.0)["params"]


def test_untied_head_and_sinusoidal_positions():
    """No position parameters; the untied head is a vocabulary matrix, out of Kaplan's N like the embedding."""
    cfg = preset("tiny", vocab_size=100, tie_embeddings=False, position="sinusoidal")
    out = flops(cfg, tokens=1.0)
    assert out["params"] == 128 * 64 + 99_968 + 128 + 128 * 64 == 116_480
    assert out["params"] == Transformer(cfg).num_params(exclude_positions=False)
    assert out["params_no_embed"] == 100_096


def test_gpt2_124m_exact_count_is_about_twice_6nd():
    """For a model this small the embedding and logits matmuls (2·V·d each per token, V = 50304) and
    attention over 1024 positions weigh as much as the blocks: the exact count is ~2.13x Kaplan's 6·N·D. The
    paper's table A4 finds the two within a few percent only for models of billions of parameters."""
    cfg = preset("gpt2-124m", vocab_size=50257)
    out = flops(cfg, tokens=1e9)
    V, d, S, L, h, f = 50304, 768, 1024, 12, 12, 3072
    block = 2 * 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * f + f) + (f * d + d)
    assert out["params_no_embed"] == L * block + 2 * d == 85_056_000
    assert out["params"] == 85_056_000 + V * d + S * d == 124_475_904
    per_layer = 2 * 3 * d * d + 2 * S * d + 3 * h * S + 2 * S * d + 2 * d * d + 2 * 2 * d * f  # per token
    forward_per_token = 2 * V * d + L * per_layer + 2 * d * V
    assert forward_per_token == 362_594_304
    assert out["flops_per_token_chinchilla"] == 3 * forward_per_token == 1_087_782_912
    assert out["flops_6nd_no_embed"] == 6 * 85_056_000 * 1e9 == 5.10336e17
    assert out["flops_chinchilla"] / out["flops_6nd_no_embed"] == pytest.approx(2.1315, abs=1e-4)
    assert out["flops_6nd"] == 6 * 124_475_904 * 1e9


def test_bad_input():
    with pytest.raises(UserError, match="tokens must be a finite number >= 0"):
        flops(preset("tiny", vocab_size=100), tokens=-1)
    with pytest.raises(UserError, match="seq_len must be >= 1"):
        flops(preset("tiny", vocab_size=100), tokens=1, seq_len=0)
    with pytest.raises(UserError, match="vocab_size is not set"):
        flops(preset("tiny"), tokens=1)


def test_encoder_by_hand():
    """BERT-style: blocks as a decoder's (appendix F ignores the causal mask), then the MLM head's transform
    and logits at every position. An encoder has no `output`: this used to raise AttributeError."""
    cfg = preset("tiny", vocab_size=100, arch="encoder", norm_position="post", embed_norm=True, type_vocab_size=2)
    out = flops(cfg, tokens=1e6)

    embeddings = 128 * 64 + 64 * 64 + 2 * 64  # token, position, type: 12_416
    rest = 2 * 64 + 2 * 49_984 + (64 * 64 + 64 + 2 * 64 + 128) + (64 * 64 + 64) + (64 * 2 + 2)  # embed norm, blocks, mlm, pooler, nsp
    assert out["params"] == embeddings + rest == 121_218 == Transformer(cfg).num_params(exclude_positions=False)
    assert out["params_no_embed"] == rest == 108_802

    forward = (
        2 * 64 * 128 * 64  # embeddings                     1_048_576
        + 2 * (3_194_880 + 4_194_304)  # blocks: attention and dense, as test_tiny_config_by_hand
        + 2 * 64 * 64 * 64  # MLM transform (d x d)         524_288
        + 2 * 64 * 64 * 128  # logits                       1_048_576
    )
    assert forward == 17_399_808
    assert out["flops_per_token_chinchilla"] == 3 * forward / 64 == 815_616


def test_encoder_decoder_by_hand():
    """The encoder's blocks over the source, the decoder's over the target with cross-attention over the
    source, both embeddings: 3 encoder and 2 decoder blocks, source 32 and target 64 tokens."""
    cfg = preset("tiny", vocab_size=100, arch="encoder-decoder", n_encoder_layer=3)
    S, T, d, V, H, f = 32, 64, 64, 128, 4, 256

    def self_attention(n):  # QKV, logits, softmax, softmax @ V, final linear
        return 2 * 3 * n * d * d + 2 * n * n * d + 3 * H * n * n + 2 * n * n * d + 2 * n * d * d

    encoder_block = self_attention(S) + 2 * S * 2 * d * f  # 1_323_008 + 2_097_152
    cross = (
        2 * T * d * d  # query projection of the target           524_288
        + 2 * 2 * S * d * d  # key and value projections of the source  524_288
        + 2 * T * S * d  # logits                                 262_144
        + 3 * H * T * S  # softmax                                 24_576
        + 2 * T * S * d  # softmax @ value                        262_144
        + 2 * T * d * d  # final linear                           524_288
    )
    assert (encoder_block, cross) == (3_420_160, 2_121_728)
    decoder_block = self_attention(T) + cross + 2 * T * 2 * d * f  # 3_194_880 + 2_121_728 + 4_194_304
    forward = 2 * S * V * d + 2 * T * V * d + 3 * encoder_block + 2 * decoder_block + 2 * T * d * V
    assert forward == 31_903_744
    assert chinchilla_forward_flops(cfg, T, src_len=S) == forward

    # flops() takes the source as long as the target: seq_len tokens on each side.
    self_64 = self_attention(64)
    cross_64 = 2 * 64 * d * d + 2 * 2 * 64 * d * d + 2 * 64 * 64 * d + 3 * H * 64 * 64 + 2 * 64 * 64 * d + 2 * 64 * d * d
    forward_64 = 2 * 64 * V * d * 2 + 3 * (self_64 + 4_194_304) + 2 * (self_64 + cross_64 + 4_194_304) + 2 * 64 * d * V
    assert forward_64 == 46_481_408
    out = flops(cfg, tokens=1e6)
    assert out["flops_per_token_chinchilla"] == 3 * forward_64 / 64 == 2_178_816

    block, cross_params = 49_984, 64 + (64 * 64 + 64) + (64 * 128 + 128) + (64 * 64 + 64) + 64  # norm, q, kv, proj
    assert out["params"] == 128 * 64 + 64 * 64 + 3 * block + 64 * 2 + 2 * (block + cross_params) + 64 * 2 == 296_000
    assert out["params"] == Transformer(cfg).num_params(exclude_positions=False)
    assert out["params_no_embed"] == 296_000 - 128 * 64 - 64 * 64 == 283_712


def test_encoder_decoder_with_grouped_query_attention_by_hand():
    """Grouped-query self-attention (2 key/value heads of 4) in both stacks, but cross-attention keys and
    values at all 4 heads: CrossAttention projects the memory to 2 x d_model whatever n_kv_head is."""
    cfg = preset("tiny", vocab_size=100, arch="encoder-decoder", n_encoder_layer=3, n_kv_head=2)
    assert Transformer(cfg).layers[0].cross_attention.kv.weight.shape == (2 * 64, 64)  # K and V, 4 heads of 16
    S, T, d, V, H, f = 32, 64, 64, 128, 4, 256

    def self_attention(n):  # Q at 4 heads, K and V at 2, logits, softmax, softmax @ V, final linear
        return 2 * n * d * d + 2 * 2 * n * d * (2 * 16) + 2 * n * n * d + 3 * H * n * n + 2 * n * n * d + 2 * n * d * d

    assert (self_attention(S), self_attention(T)) == (1_060_864, 2_670_592)
    cross = (
        2 * T * d * d  # query projection of the target            524_288
        + 2 * 2 * S * d * (4 * 16)  # K and V of the source, all 4 heads 524_288 (2 heads would be 262_144)
        + 2 * T * S * d + 3 * H * T * S + 2 * T * S * d  # logits, softmax, softmax @ value
        + 2 * T * d * d  # final linear                            524_288
    )
    assert cross == 2_121_728  # as with multi-head attention in test_encoder_decoder_by_hand
    encoder_block = self_attention(S) + 2 * S * 2 * d * f
    decoder_block = self_attention(T) + cross + 2 * T * 2 * d * f
    forward = 2 * S * V * d + 2 * T * V * d + 3 * encoder_block + 2 * decoder_block + 2 * T * d * V
    assert forward == 30_068_736
    assert chinchilla_forward_flops(cfg, T, src_len=S) == forward
