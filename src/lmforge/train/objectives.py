"""What a training step predicts: causal next-token (GPT), masked-LM (BERT), masked-LM +
next-sentence, or sequence-to-sequence with teacher forcing (the encoder-decoder Transformer).

An `Objective` opens its data (token windows, or parallel pairs for seq2seq), turns it into
batches (a pure function of seed, step and micro-batch) and batches into a loss; the training
loop is the same for all of them.
"""

from __future__ import annotations

from typing import Callable, Literal

import torch
import torch.nn.functional as F

from lmforge.config import ModelConfig
from lmforge.data import load_meta, open_split
from lmforge.data.loader import TokenWindows
from lmforge.data.mlm import MaskingSpec, mlm_batch
from lmforge.data.parallel import ParallelPairs
from lmforge.model import Transformer
from lmforge.model.losses import IGNORE_INDEX, chunked_lm_loss, lm_loss, scored_vocab
from lmforge.tokenizer import Tokenizer
from lmforge.utils.device import autocast
from lmforge.utils.errors import UserError

ObjectiveName = Literal["causal", "mlm", "mlm+nsp", "seq2seq"]
# The architecture each pretraining objective trains.
OBJECTIVE_ARCH = {"causal": "decoder", "mlm": "encoder", "mlm+nsp": "encoder", "seq2seq": "encoder-decoder"}
Batch = dict[str, torch.Tensor]
_VAL_SEED = 0xFFFF_FFFF  # one fixed masking of the validation batches, whatever the training seed


class Objective:
    def __init__(
        self, name: str, config: ModelConfig, tokenizer: Tokenizer, seed: int, parallel_data: bool = False, chunked_loss: int = 0,
        label_smoothing: float = 0.0,
    ) -> None:
        """`chunked_loss` > 0: the causal loss goes through `chunked_lm_loss` in chunks of that many tokens.
        `label_smoothing` applies while the model is in training mode; validation (eval mode) is plain."""
        if name not in ObjectiveName.__args__:
            raise UserError(f"objective {name!r} is not supported; use one of {list(ObjectiveName.__args__)}")
        wants = OBJECTIVE_ARCH[name]
        if config.arch != wants:
            fitting = next(k for k, v in OBJECTIVE_ARCH.items() if v == config.arch)
            raise UserError(
                f"the {name} objective trains {wants} models but model.arch is {config.arch}; "
                f"use --objective {fitting} or another --model.preset"
            )
        if name == "mlm+nsp" and config.type_vocab_size < 2:
            raise UserError("next-sentence prediction needs two token types; set --model.type_vocab_size 2")
        if parallel_data != (name == "seq2seq"):
            raise UserError(
                "seq2seq trains on parallel data (`lmforge prepare SRC --target TGT`)" if name == "seq2seq"
                else f"the data is parallel text, which only --objective seq2seq trains on; prepare plain text for {name}"
            )
        if chunked_loss and name != "causal":
            raise UserError(f"train.chunked_loss applies to the causal objective only, not {name}; drop --train.chunked_loss")
        self.name, self.seed, self.tokenizer, self.chunked_loss = name, seed, tokenizer, chunked_loss
        self.label_smoothing = label_smoothing
        # Whether a step's micro-batches count by their predictions (`weight`): yes where the counts
        # differ (masked tokens, target lengths). Causal windows all predict batch_size x seq_len tokens,
        # so equal shares are the same without counting (or, across processes, an all-reduce a step);
        # mlm+nsp adds a mean over masked tokens to one over sequences: no one count weighs both, and
        # equal shares keep the next-sentence part exact.
        self.token_weighted = name in ("mlm", "seq2seq")
        self.spec = MaskingSpec.from_tokenizer(tokenizer, config.vocab_size) if name in ("mlm", "mlm+nsp") else None

    def open(self, data: str, split: str, seq_len: int, required: bool = True) -> TokenWindows | ParallelPairs | None:
        """The split's data source; None for an optional split too small to use."""
        if self.name == "seq2seq":
            pairs = ParallelPairs.open(data, split, self.tokenizer, seq_len)
            return pairs if len(pairs) or required else None
        meta = load_meta(data)
        if not required and meta["splits"][split]["tokens"] <= seq_len:
            return None
        return TokenWindows(open_split(data, split), seq_len, split)

    @staticmethod
    def describe(meta: dict) -> str:
        train = meta["splits"]["train"]
        if "pairs" in train:
            return f"{train['pairs']:,} train pairs ({train['src_tokens']:,} + {train['tgt_tokens']:,} tokens)"
        return f"{train['tokens']:,} train tokens"

    @property
    def reports_bpb(self) -> bool:
        """Only next-token loss is a compression rate of the text (bits per byte)."""
        return self.name == "causal"

    def batch(self, windows, batch_size: int, step: int, micro: int = 0, seed: int | None = None) -> Batch:
        seed = self.seed if seed is None else seed
        if self.name == "seq2seq":
            return windows.random_batch(batch_size, seed, step, micro)
        if self.spec is None:
            x, y = windows.random_batch(batch_size, seed, step, micro)
            return {"input_ids": x, "labels": y}
        return mlm_batch(windows, self.spec, batch_size, seed, step, micro, nsp=self.name == "mlm+nsp")

    def val_batches(self, windows, batch_size: int, n_batches: int) -> list[Batch]:
        """Fixed validation batches: evenly spread windows (causal), a fixed masking (MLM), the first pairs (seq2seq)."""
        if self.name == "seq2seq":
            return windows.first_batches(batch_size, n_batches)
        if self.spec is None:
            return [{"input_ids": x, "labels": y} for x, y in windows.spread_batches(batch_size, n_batches)]
        return [self.batch(windows, batch_size, step=i, seed=_VAL_SEED) for i in range(n_batches)]

    def loss(self, model: Transformer, batch: Batch) -> torch.Tensor:
        eps = self.label_smoothing if model.training else 0.0
        V = scored_vocab(model, self.label_smoothing)
        if self.name == "causal" and self.chunked_loss:
            hidden = model(batch["input_ids"], return_hidden=True)
            return chunked_lm_loss(hidden, model.output.weight, batch["labels"], self.chunked_loss, label_smoothing=eps,
                                   vocab_size=V)
        if self.name == "causal":
            return lm_loss(model(batch["input_ids"]), batch["labels"], label_smoothing=eps, vocab_size=V)
        if self.name == "seq2seq":
            memory = model.encode_source(batch["src"], batch["src_mask"])
            logits = model(batch["input_ids"], memory=memory, memory_mask=batch["src_mask"])
            return lm_loss(logits, batch["labels"], label_smoothing=eps, vocab_size=V)
        hidden = model.encode(batch["input_ids"], token_type_ids=batch["token_type_ids"])
        loss = lm_loss(model.mlm(hidden), batch["labels"], label_smoothing=eps, vocab_size=V)
        if "nsp_labels" in batch:
            loss = loss + F.cross_entropy(model.nsp_logits(hidden).float(), batch["nsp_labels"], label_smoothing=eps)
        return loss

    def weight(self, batch: Batch) -> int:
        """How many predictions a batch's mean loss averages over: its predicted tokens."""
        return int((batch["labels"] != IGNORE_INDEX).sum())


@torch.no_grad()
def weighted_mean_loss(
    loss: Callable[[torch.nn.Module, Batch], torch.Tensor],
    weight: Callable[[Batch], int],
    model: torch.nn.Module,
    batches: list[Batch],
    device: torch.device,
    amp: torch.dtype | None,
) -> float:
    """The mean of `loss` over `batches` in eval mode, each batch weighted by `weight(batch)`
    (the predictions its mean loss averages over), so the result is the per-prediction mean."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast(device, amp):
            value = loss(model, batch)
        n = weight(batch)
        if n:  # a batch without predictions (an SFT batch whose replies lie past max_length) weighs nothing
            total, count = total + value.item() * n, count + n
    model.train(was_training)
    return total / max(count, 1)
