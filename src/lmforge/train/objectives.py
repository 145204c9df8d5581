"""What a training step predicts: causal next-token (GPT), masked-LM (BERT), masked-LM + next-sentence.

An `Objective` turns token windows into batches (a pure function of seed, step and micro-batch)
and batches into a loss; the training loop is the same for all of them.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from lmforge.config import ModelConfig
from lmforge.data.loader import TokenWindows
from lmforge.data.mlm import IGNORE, MaskingSpec, mlm_batch
from lmforge.model import Transformer
from lmforge.model.losses import lm_loss
from lmforge.tokenizer import Tokenizer
from lmforge.utils.device import autocast
from lmforge.utils.errors import UserError

ObjectiveName = Literal["causal", "mlm", "mlm+nsp"]
Batch = dict[str, torch.Tensor]
_VAL_SEED = 0xFFFF_FFFF  # one fixed masking of the validation batches, whatever the training seed


class Objective:
    def __init__(self, name: str, config: ModelConfig, tokenizer: Tokenizer, seed: int) -> None:
        wants = "decoder" if name == "causal" else "encoder"
        if name not in ObjectiveName.__args__:
            raise UserError(f"objective {name!r} is not supported; use one of {list(ObjectiveName.__args__)}")
        if config.arch != wants:
            raise UserError(
                f"the {name} objective trains {wants} models but model.arch is {config.arch}; "
                f"use --objective {'causal' if config.arch == 'decoder' else 'mlm'} or another --model.preset"
            )
        if name == "mlm+nsp" and config.type_vocab_size < 2:
            raise UserError("next-sentence prediction needs two token types; set --model.type_vocab_size 2")
        self.name, self.seed = name, seed
        self.spec = MaskingSpec.from_tokenizer(tokenizer, config.vocab_size) if name != "causal" else None

    @property
    def reports_bpb(self) -> bool:
        """Only next-token loss is a compression rate of the text (bits per byte)."""
        return self.name == "causal"

    def batch(self, windows: TokenWindows, batch_size: int, step: int, micro: int = 0, seed: int | None = None) -> Batch:
        seed = self.seed if seed is None else seed
        if self.spec is None:
            x, y = windows.random_batch(batch_size, seed, step, micro)
            return {"input_ids": x, "labels": y}
        return mlm_batch(windows, self.spec, batch_size, seed, step, micro, nsp=self.name == "mlm+nsp")

    def val_batches(self, windows: TokenWindows, batch_size: int, n_batches: int) -> list[Batch]:
        """Fixed validation batches: evenly spread windows (causal) or a fixed masking (MLM)."""
        if self.spec is None:
            return [{"input_ids": x, "labels": y} for x, y in windows.spread_batches(batch_size, n_batches)]
        return [self.batch(windows, batch_size, step=i, seed=_VAL_SEED) for i in range(n_batches)]

    def loss(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        if self.spec is None:
            return lm_loss(model(batch["input_ids"]), batch["labels"])
        net: Transformer = getattr(model, "_orig_mod", model)  # the module behind torch.compile
        hidden = net.encode(batch["input_ids"], token_type_ids=batch["token_type_ids"])
        loss = lm_loss(net.mlm(hidden), batch["labels"], ignore_index=IGNORE)
        if "nsp_labels" in batch:
            loss = loss + F.cross_entropy(net.nsp_logits(hidden).float(), batch["nsp_labels"])
        return loss

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, batches: list[Batch], device: torch.device, amp: torch.dtype | None) -> float:
        """Mean validation loss, weighted by the number of predicted tokens of each batch."""
        was_training = model.training
        model.eval()
        total, count = 0.0, 0
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            with autocast(device, amp):
                loss = self.loss(model, batch)
            n = int((batch["labels"] != IGNORE).sum())
            total, count = total + loss.item() * n, count + n
        model.train(was_training)
        return total / max(count, 1)
