"""`pretrain`: token shards in, a checkpoint directory out (a new model, trained by `fit`)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch

from lmforge.checkpoint import check_run_out
from lmforge.config import ModelConfig, TrainConfig, preset
from lmforge.data import load_meta
from lmforge.model import Transformer
from lmforge.tokenizer import Tokenizer
from lmforge.train.loop import RunResult, fit
from lmforge.train.objectives import Objective
from lmforge.utils.device import free_memory, resolve_device
from lmforge.utils.errors import UserError


def pretrain(
    data: str | Path,
    out: str | Path,
    model: ModelConfig | str | None = None,
    train: TrainConfig | dict[str, Any] | None = None,
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
    `log` takes the progress lines (None: silent).
    """
    t0 = time.perf_counter()
    log = log or (lambda *args: None)
    train = TrainConfig.of(train)  # a dict sets some fields over the defaults
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

    check_memory(model_cfg, train)  # before the weights exist: the kernel's OOM killer would end the run unexplained

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


def refuse_finetuning_fields(task_head: str | None, labels: Any, lora: Any) -> None:
    """A head or adapters would be saved untrained (random) beside the language model that was trained. The
    CLI asks before it builds the config, whose own check (a head needs labels) would point the other way."""
    for name, given in (("task_head", task_head not in (None, "none")), ("labels", labels), ("lora", lora)):
        if given:
            raise UserError(f"model.{name} belongs to fine-tuning, not pretraining; drop it here and pass it to "
                            f"`lmforge finetune` on the pretrained checkpoint")


def _resolve_model_config(model: ModelConfig | str | None, meta: dict) -> ModelConfig:
    cfg = preset(model) if isinstance(model, str) else (model or ModelConfig())
    refuse_finetuning_fields(cfg.task_head, cfg.labels, cfg.lora)
    if cfg.vocab_size is None:
        return cfg.replace(vocab_size=meta["vocab_size"])
    if cfg.vocab_size < meta["vocab_size"]:
        raise UserError(
            f"model.vocab_size {cfg.vocab_size} is smaller than the data's tokenizer ({meta['vocab_size']}); "
            "drop --model.vocab_size to take it from the data"
        )
    return cfg


def count_params(model: ModelConfig) -> tuple[int, int]:
    """(parameters, elements of the buffers: position tables) of the model `model` describes, without
    building it: one model of one block per stack and one of two, on the meta device (shapes, no storage),
    give the fixed part and each block's, so that a model of any size is counted in milliseconds."""
    def count(n_layer: int, n_encoder_layer: int) -> tuple[int, int]:
        with torch.device("meta"):
            net = Transformer(model.replace(n_layer=n_layer, n_encoder_layer=n_encoder_layer))
        return net.num_params(exclude_positions=False), sum(b.numel() for b in net.buffers())

    base, decoder_block = count(1, 1), count(2, 1)
    total = [b + (model.n_layer - 1) * (d - b) for b, d in zip(base, decoder_block)]
    if model.arch == "encoder-decoder":
        encoder_block = count(1, 2)
        total = [t + ((model.n_encoder_layer or model.n_layer) - 1) * (e - b) for t, b, e in zip(total, base, encoder_block)]
    return total[0], total[1]


def check_memory(model: ModelConfig, train: TrainConfig) -> None:
    """Refuse, in one line, a model whose weights, gradients and optimizer state alone exceed the memory
    available where it trains: the kernel's OOM killer would end the run with no message. Only a model
    that cannot fit is refused: the estimate is a lower bound (activations come on top)."""
    params, buffers = count_params(model)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    shards = world if world > 1 and train.parallel == "fsdp" else 1
    # fp32 weights and gradients (autocast keeps the weights fp32), AdamW's two moments (Muon's matrices: one).
    per_param = 4 + 4 + (8 if train.optim == "adamw" else 4)
    training = -(-params // shards) * per_param + buffers * 4
    built = (params + buffers) * 4  # every process first builds the whole model on the CPU
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # the processes of this machine share its memory
    device = resolve_device(train.device)
    if device.type == "cuda" and device.index is None:  # each torchrun process takes cuda:LOCAL_RANK
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", torch.cuda.current_device())))
    what = f"weights, gradients and {train.optim} state"
    checks = [(device, max(training, built) * processes, what)] if device.type == "cpu" else [
        (torch.device("cpu"), built * processes, "weights, built there before they move to the GPU"), (device, training, what)]
    for where, needed, what in checks:
        available = free_memory(where)
        if available is not None and needed > available:
            kind = "GPU" if where.type == "cuda" else "CPU"
            raise UserError(
                f"this model ({params:,} parameters) needs at least {needed / 1e9:,.1f} GB of {kind} memory to train "
                f"({what}), but {available / 1e9:,.1f} GB is available; choose a smaller model (fewer or narrower layers)"
            )
