"""Parameters and training FLOPs of a model config: 6·N·D (N with or without embeddings) and Chinchilla's exact count.

Kaplan et al. 2020 (arXiv:2001.08361, section 2.1) estimate training compute as C = 6 N D with N the
non-embedding parameters; the sweep's `flops` column and `plan` take N to be every parameter, the N of
Hoffmann et al. 2022 (arXiv:2203.15556). Their appendix F counts every matmul of the forward pass,
embeddings and logits and attention over the sequence included, and takes the backward pass as twice
the forward. Their table A4 finds that count and 6 N D within a few percent for large models; for
small ones the embedding, logits and attention terms make the exact count much larger.
"""

from __future__ import annotations

import math
from numbers import Real

import torch
from torch import nn

from lmforge.config import ModelConfig
from lmforge.model import Transformer
from lmforge.utils.errors import UserError


def _param_counts(config: ModelConfig) -> tuple[int, int]:
    """(all parameters, embedding parameters), read off the real module tree.

    The model is built on the meta device: shapes without storage, so GPT-2-sized configs cost
    milliseconds and the count can never drift from what `Transformer` builds.
    """
    with torch.device("meta"):
        model = Transformer(config)
    total = model.num_params(exclude_positions=False)  # tied weights counted once
    embed = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Embedding))
    head = model.mlm.decoder if config.arch == "encoder" else model.output  # an encoder's vocabulary head is its MLM's
    if head.weight is not model.tok_embeddings.weight:
        embed += head.weight.numel()  # an untied head is a vocabulary matrix too
    return total, embed


def chinchilla_forward_flops(config: ModelConfig, seq_len: int, src_len: int | None = None) -> int:
    """Forward FLOPs of one sequence of `seq_len` tokens, term by term as Hoffmann et al. 2022, appendix F.

    A matmul of (m x k) by (k x n) costs 2 m k n (a multiply and an add). Like the paper, this ignores
    norms, biases, nonlinearities and the causal mask's savings, and counts the embedding lookup as a
    one-hot matmul (the token embedding only: position and token-type embeddings are additions, as the
    paper leaves positions out). `vocab` is the padded vocabulary, the width the embedding and logits
    really have.

    Generalised to the structure the config really builds, where appendix F assumes the paper's
    decoder-only architecture (multi-head attention, a two-matrix FFN):
      - grouped-query attention: the key and value projections are d_model x (key_size * n_kv_heads),
        not x (key_size * n_heads); the logits, softmax and attention over values still run once per
        query head. The paper's "3 x" QKV term becomes 1 query + 2 key/value projections.
      - SwiGLU: three d_model x ffw_size matrices (gate, up, down), not two.
      - encoder (BERT): the same blocks (bidirectional attention costs what the paper counts, since it
        ignores the causal mask), then the MLM head at every position: its d_model x d_model transform
        and the logits. The pooler and next-sentence head run once per sequence, and only for the
        `mlm+nsp` objective: 2 d^2 + 4 d FLOPs a sequence, left out.
      - encoder-decoder: the source (`src_len` tokens, default `seq_len`) is embedded and runs through
        the encoder's blocks; each decoder block adds cross-attention, the appendix's attention terms
        with the queries from the `seq_len` target positions and the keys and values (all heads: cross-
        attention has no grouping) from the `src_len` source positions. Logits are the target's.
    With n_kv_heads = n_heads and a GELU/ReLU FFN every decoder-only term is the paper's formula
    unchanged (tests/scaling/test_flops.py checks it, and the encoder and encoder-decoder, by hand).
    Why: Llama-family configs would otherwise be counted with ~1/3 too little FFN compute and too much
    key/value compute, and encoder-decoders as if they were their decoder alone.
    """
    seq, d_model, vocab = seq_len, config.n_embd, config.padded_vocab_size
    src = seq if src_len is None else src_len
    key_size, n_heads, ffw_size = config.head_size, config.n_head, config.hidden_size
    ffw_matrices = 3 if config.mlp == "swiglu" else 2

    def attention(queries: int, keys: int, n_kv_heads: int) -> int:
        return (
            2 * queries * d_model * (key_size * n_heads)  # query projection
            + 2 * 2 * keys * d_model * (key_size * n_kv_heads)  # key and value projections
            + 2 * queries * keys * (key_size * n_heads)  # key @ query logits
            + 3 * n_heads * queries * keys  # softmax
            + 2 * queries * keys * (key_size * n_heads)  # softmax @ value reductions
            + 2 * queries * (key_size * n_heads) * d_model  # final linear
        )

    def block(n: int) -> int:  # self-attention and the dense block over n positions
        return attention(n, n, config.kv_heads) + 2 * n * ffw_matrices * d_model * ffw_size

    embeddings = 2 * seq * vocab * d_model
    blocks = config.n_layer * block(seq)
    logits = 2 * seq * d_model * vocab
    if config.arch == "encoder":
        logits += 2 * seq * d_model * d_model  # the MLM head's dense transform before its logits
    elif config.arch == "encoder-decoder":
        embeddings += 2 * src * vocab * d_model
        blocks += (config.n_encoder_layer or config.n_layer) * block(src) + config.n_layer * attention(seq, src, n_heads)
    return embeddings + blocks + logits


def flops(config: ModelConfig, tokens: float, seq_len: int | None = None) -> dict[str, float]:
    """Parameter counts and the training compute of `tokens` tokens, both ways.

    Args:
        config: the architecture; `vocab_size` must be set.
        tokens: training tokens D.
        seq_len: tokens per training sequence; defaults to `config.context_length`. Only the exact
            count depends on it (attention cost grows with the sequence). For an encoder-decoder, the
            target's; the source is taken to be as long (both are cut to the same length in training),
            so `tokens` counts target tokens and the encoder's work is charged to them.

    Returns:
        params: every parameter, embeddings and positions included, tied weights counted once
            (the N of Hoffmann et al. 2022).
        params_no_embed: without the token embedding, learned position embedding and an untied output
            head: Kaplan et al.'s N ("excluding all vocabulary and positional embeddings").
        flops_6nd: 6 * params * tokens, C = 6 N D with every parameter: the `flops` a sweep's rows
            hold, the C of `plan` and of Chinchilla's fits.
        flops_6nd_no_embed: 6 * params_no_embed * tokens, Kaplan's C (section 2.1), with Kaplan's N.
        flops_chinchilla: Hoffmann et al. 2022, appendix F: 3 x the forward pass (backward = 2 x forward),
            with grouped-query attention, SwiGLU, an encoder's MLM head and an encoder-decoder's encoder
            and cross-attention counted as built (see `chinchilla_forward_flops`).
        flops_per_token_chinchilla: the same per training token.
    """
    if isinstance(tokens, bool) or not isinstance(tokens, Real) or not math.isfinite(tokens) or tokens < 0:
        raise UserError(f"tokens must be a finite number >= 0, got {tokens!r}; pass the training token count")
    seq = config.context_length if seq_len is None else seq_len
    if seq < 1:
        raise UserError(f"seq_len must be >= 1, got {seq}; pass the training sequence length")
    total, embed = _param_counts(config)
    per_token = 3 * chinchilla_forward_flops(config, seq) / seq
    return {
        "params": total,
        "params_no_embed": total - embed,
        "flops_6nd": 6.0 * total * tokens,
        "flops_6nd_no_embed": 6.0 * (total - embed) * tokens,
        "flops_chinchilla": per_token * tokens,
        "flops_per_token_chinchilla": per_token,
    }
