"""`pretrain`: token shards in, a checkpoint directory out (a new model, trained by `fit`)."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from lmforge.checkpoint import check_run_out
from lmforge.config import ModelConfig, TrainConfig, preset
from lmforge.data import load_meta
from lmforge.model import Transformer
from lmforge.tokenizer import Tokenizer
from lmforge.train.loop import RunResult, fit
from lmforge.train.objectives import Objective
from lmforge.utils.errors import UserError


def pretrain(
    data: str | Path,
    out: str | Path,
    model: ModelConfig | str | None = None,
    train: TrainConfig | None = None,
    resume: bool = False,
    objective: str = "causal",
    progress: bool = True,
    log=print,
) -> RunResult:
    """Train a model on prepared shards in `data`, writing checkpoints under `out`.

    `model` is a config or a preset name (default: `ModelConfig()`, the GPT-2 124M shape); its
    vocab_size, when unset, is the data's tokenizer's. `objective` is `causal` (decoders),
    `mlm` / `mlm+nsp` (encoders, e.g. `bert-base`) or `seq2seq` (encoder-decoders, on parallel
    data from `prepare_parallel`). With `resume`, continue from the latest checkpoint in `out`.
    """
    t0 = time.perf_counter()
    train = train or TrainConfig()
    meta = load_meta(data)  # token shards or parallel pairs (kind "parallel"), checked either way
    check_run_out(out)  # not in the data (which `prepare` replaces as a whole), nor in a checkpoint
    tokenizer = Tokenizer.load(data, fix=f"the shards in {data} were made with it: restore it, or re-run "
                                         f"`lmforge prepare ... --out {data}` with the tokenizer you mean")
    if meta.get("tokenizer_sha256") != tokenizer.sha256:  # the tokenizer.json was replaced after `prepare`
        raise UserError(
            f"{Path(data) / 'tokenizer.json'} does not match the one the shards were made with (sha256 "
            f"{tokenizer.sha256[:12]}, meta.json says {str(meta.get('tokenizer_sha256'))[:12]}); "
            f"re-run `lmforge prepare ... --out {data}` with the tokenizer you mean"
        )
    model_cfg = _resolve_model_config(model, meta)
    task = Objective(objective, model_cfg, tokenizer, train.seed, parallel_data=meta.get("kind") == "parallel",
                     chunked_loss=train.chunked_loss, label_smoothing=train.label_smoothing)
    seq_len = train.seq_len or model_cfg.context_length
    if seq_len > model_cfg.context_length:
        raise UserError(f"train.seq_len {seq_len} exceeds model.context_length {model_cfg.context_length}; lower one or raise the other")

    torch.manual_seed(train.seed)
    net = Transformer(model_cfg)
    train_source = task.open(data, "train", seq_len)
    val_source = task.open(data, "val", seq_len, required=False) if train.eval_interval else None
    val = meta["splits"].get("val", {})
    if train.eval_interval and val_source is None:
        held = (f"{val.get('pairs', 0)} pairs" if "pairs" in val
                else f"{val.get('tokens', 0)} tokens, no more than seq_len {seq_len}")
        log(f"validation is off: the val split holds {held}; prepare the data with a larger --val-fraction to validate")
    return fit(
        net, task, tokenizer, train, out, train_source, val_source,
        tokens_per_sample=seq_len,
        resume=resume,
        state={"data": str(data), "objective": objective},
        val_tokens_bytes=(val["tokens"], val["bytes"]) if task.reports_bpb and val_source is not None else None,
        describe=task.describe(meta),
        progress=progress,
        log=log,
        t0=t0,
    )


def _resolve_model_config(model: ModelConfig | str | None, meta: dict) -> ModelConfig:
    cfg = preset(model) if isinstance(model, str) else (model or ModelConfig())
    if cfg.vocab_size is None:
        return cfg.replace(vocab_size=meta["vocab_size"])
    if cfg.vocab_size < meta["vocab_size"]:
        raise UserError(
            f"model.vocab_size {cfg.vocab_size} is smaller than the data's tokenizer ({meta['vocab_size']}); "
            "drop --model.vocab_size to take it from the data"
        )
    return cfg
