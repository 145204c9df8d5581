"""Batches for BERT's objectives: masked-LM (MLM) and next-sentence prediction (NSP).

Devlin et al. 2018, section 3.1 and appendix A.1: 15% of the (non-special) positions are chosen;
a chosen token becomes [MASK] 80% of the time, a random token 10% of the time and stays itself
10% of the time; the model predicts the original token at the chosen positions only. For NSP,
segment B follows segment A in the text half of the time and comes from a random place otherwise.

A sequence is `[CLS] A [SEP]` (MLM) or `[CLS] A [SEP] B [SEP]` (MLM+NSP) with token types 0 for
`[CLS] A [SEP]` and 1 for `B [SEP]`. Segments are spans of tokens. A random B comes from another
document than the one A ends in, as in BERT's create_pretraining_data.py: a draw that lands in A's
document is redrawn, up to 10 times (a corpus of one document keeps the last draw). Like `TokenWindows.random_batch`, a batch is a pure function of (seed, step, micro).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lmforge.data.loader import TokenWindows
from lmforge.model.losses import IGNORE_INDEX
from lmforge.utils.errors import UserError



@dataclass(frozen=True)
class MaskingSpec:
    """Token ids the objective needs, and its probabilities."""

    cls_id: int
    sep_id: int
    mask_id: int
    vocab_size: int
    special_ids: tuple[int, ...]
    mask_prob: float = 0.15
    replace_with_mask: float = 0.8
    replace_with_random: float = 0.1
    eot_id: int | None = None  # the end-of-text token that closes every document; None: documents unknown

    @classmethod
    def from_tokenizer(cls, tokenizer, vocab_size: int) -> "MaskingSpec":
        ids = {"cls": tokenizer.cls_id, "sep": tokenizer.sep_id, "mask": tokenizer.mask_id}
        missing = [name for name, i in ids.items() if i is None]
        if missing:
            raise UserError(
                f"the tokenizer has no {'/'.join(missing)} token, which masked-LM training needs; "
                "train one with `lmforge tokenizer train` (it adds <|cls|>, <|sep|>, <|mask|>)"
            )
        specials = tuple(i for i in (tokenizer.eot_id, tokenizer.pad_id, *ids.values()) if i is not None)
        return cls(ids["cls"], ids["sep"], ids["mask"], vocab_size, specials, eot_id=tokenizer.eot_id)


def mask_tokens(ids: np.ndarray, spec: MaskingSpec, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, labels) for int64 token ids of any shape: the 80/10/10 rule on 15% of non-special positions."""
    inputs = ids.copy()
    labels = np.full_like(ids, IGNORE_INDEX)
    chosen = (rng.random(ids.shape) < spec.mask_prob) & ~np.isin(ids, spec.special_ids)
    labels[chosen] = ids[chosen]
    action = rng.random(ids.shape)
    to_mask = chosen & (action < spec.replace_with_mask)
    to_random = chosen & (action >= spec.replace_with_mask) & (action < spec.replace_with_mask + spec.replace_with_random)
    inputs[to_mask] = spec.mask_id
    inputs[to_random] = rng.integers(0, spec.vocab_size, size=int(to_random.sum()))
    return inputs, labels


def mlm_batch(
    windows: TokenWindows, spec: MaskingSpec, batch_size: int, seed: int, step: int, micro: int = 0, nsp: bool = False
) -> dict[str, torch.Tensor]:
    """input_ids, token_type_ids, labels (B, T) and, with `nsp`, nsp_labels (B,): 0 = B follows A, 1 = random."""
    rng = np.random.default_rng([seed, step, micro, 1])  # the 1 keeps these draws apart from the causal sampler's
    T = windows.seq_len
    n_text = T - (3 if nsp else 2)
    if n_text < 2:
        raise UserError(f"sequences of {T} tokens leave no room for text between [CLS]/[SEP]; raise train.seq_len")
    starts = rng.integers(0, windows.num_windows, size=batch_size)
    text = windows.windows(starts)[0][:, :n_text].numpy()  # (B, n_text) contiguous text
    types = np.zeros((batch_size, T), dtype=np.int64)
    cls = np.full((batch_size, 1), spec.cls_id)
    sep = np.full((batch_size, 1), spec.sep_id)
    out: dict[str, torch.Tensor] = {}
    if nsp:
        a_len = n_text // 2
        is_random = rng.random(batch_size) < 0.5
        b = text[:, a_len:].copy()
        if is_random.any():
            others = _other_documents(windows, starts[is_random], a_len, spec.eot_id, rng)
            b[is_random] = windows.windows(others)[0].numpy()[:, : n_text - a_len]
        ids = np.concatenate([cls, text[:, :a_len], sep, b, sep], axis=1)
        types[:, a_len + 2 :] = 1
        out["nsp_labels"] = torch.from_numpy(is_random.astype(np.int64))
    else:
        ids = np.concatenate([cls, text, sep], axis=1)
    inputs, labels = mask_tokens(ids.astype(np.int64), spec, rng)
    out.update(input_ids=torch.from_numpy(inputs), token_type_ids=torch.from_numpy(types), labels=torch.from_numpy(labels))
    return out


def _other_documents(windows: TokenWindows, a_starts: np.ndarray, a_len: int, eot_id: int | None, rng: np.random.Generator, tries: int = 10) -> np.ndarray:
    """Window starts for random segments B: each drawn again, up to `tries` times, while B would open
    in the document that A (the first `a_len` tokens of the window at `a_starts`) ends in."""
    starts = rng.integers(0, windows.num_windows, size=len(a_starts))
    if eot_id is None:
        return starts
    a_docs = windows.document_ids(a_starts, eot_id, offset=a_len - 1)
    for _ in range(tries):
        same = windows.document_ids(starts, eot_id) == a_docs
        if not same.any():
            break
        starts[same] = rng.integers(0, windows.num_windows, size=int(same.sum()))
    return starts
