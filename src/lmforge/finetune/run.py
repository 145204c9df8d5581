"""`finetune`: a checkpoint plus task data in, a fine-tuned checkpoint out; `merge_lora` folds adapters in.

The fine-tuned checkpoint is an ordinary lmforge checkpoint: its config names the task head, the
labels and the LoRA adapters, and its trainer state records how inputs were laid out
(`trainer_state["task"]`), so `lmforge.pipeline`, `predict` and `eval` format raw text exactly
as the fine-tune did.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from lmforge.checkpoint import check_checkpoint_out, check_run_out, find_checkpoints, load_checkpoint, load_model, save_checkpoint
from lmforge.config import DEFAULT_DOC_STRIDE, DEFAULT_PROMPT, FINETUNE_DEFAULTS, LoraConfig, ModelConfig, TrainConfig
from lmforge.config.model import is_label_list
from lmforge.data.features import TASK_ARCHS, TASK_HEAD, TASKS, TaskFormat, featurize, label_set, read_examples
from lmforge.finetune.objective import TaskObjective
from lmforge.model import Transformer
from lmforge.model.lora import lora_parameters, merge_lora as merge_modules
from lmforge.model.losses import IGNORE_INDEX
from lmforge.train import RunResult, fit
from lmforge.utils.errors import UserError

# The fine-tuning settings a resume must keep (trainer_state["task"]), as the flags that set them: those
# that lay the inputs out, and what is frozen (the optimizer's saved state is for the parameters that
# trained). Its max_length follows --train.seq_len, which a resumed run may change (the trainer warns).
_KEPT_FLAGS = {"kind": "--task", "prompt": "--prompt", "repeat": "--repeat-input", "doc_stride": "--doc-stride",
               "freeze_embeddings": "--freeze-embeddings", "freeze_layers": "--freeze-layers"}


def finetune(
    checkpoint: str | Path,
    task: str,
    data: str | Path,
    out: str | Path,
    *,
    target: str | Path | None = None,
    val: str | Path | None = None,
    val_target: str | Path | None = None,
    split_articles: float | None = None,
    train: TrainConfig | dict[str, Any] | None = None,
    lora: LoraConfig | None = None,
    freeze_embeddings: bool = False,
    freeze_layers: int = 0,
    labels: list[str] | None = None,
    text_field: str | None = None,
    label_field: str | None = None,
    prompt: str = DEFAULT_PROMPT,
    doc_stride: int = DEFAULT_DOC_STRIDE,
    repeat_input: bool = False,
    dropout: float | None = None,
    resume: bool = False,
    progress: bool = True,
    log=print,
) -> RunResult:
    """Fine-tune `checkpoint` for `task` (classify, tag, qa, seq2seq, sft) on `data`, writing OUT/step-N.

    `val` (with `val_target` for parallel text) is scored during training; for QA,
    `split_articles` F trains on the first F of the articles of `data` and validates on the rest.
    `train.seq_len` caps the tokens of one example (default: the model's context). With
    `lora.r` > 0 only the adapters and the task head train; `freeze_embeddings` and
    `freeze_layers` k freeze the embeddings and the first k blocks (of each stack of an encoder-decoder)
    of a full fine-tune; with LoRA they are refused.
    `repeat_input` (decoders; tag and qa) lays each input out twice and reads the second copy,
    so that every token has seen the whole text (see `lmforge.data.features`).
    `train` None takes FINETUNE_DEFAULTS (`lmforge finetune`'s: lr 5e-5 decayed to 0, 500 steps, ...);
    a dict sets some fields over those; a TrainConfig is taken whole, and its own defaults are
    pretraining's (lr 6e-4): build one as `TrainConfig(**FINETUNE_DEFAULTS, max_steps=...)`.
    """
    t0 = time.perf_counter()
    log = log or (lambda *args: None)  # None: silent
    train = TrainConfig.of(train, FINETUNE_DEFAULTS)
    if labels is not None and not is_label_list(labels):  # before the data is read with them
        raise UserError(f"labels is {labels!r}; pass a list of label names, e.g. ['neg', 'pos']")
    check_run_out(out)
    base, ckpt = load_model(checkpoint, "cpu")
    cfg = base.config
    if task not in TASKS:
        raise UserError(f"task {task!r} is not supported; use one of {list(TASKS)}")
    if cfg.arch not in TASK_ARCHS[task]:
        raise UserError(f"--task {task} fine-tunes {' or '.join(TASK_ARCHS[task])} models, but {ckpt.path} is an {cfg.arch}")
    if cfg.lora is not None:
        raise UserError(f"{ckpt.path} holds LoRA adapters; fold them in first with `lmforge merge-lora {ckpt.path} --out DIR`")
    if doc_stride < 0:
        raise UserError(f"--doc-stride must be >= 0 (tokens of overlap between QA windows), got {doc_stride}")
    if val_target is not None and val is None:
        raise UserError("--val-target is the target file line-aligned with --val; pass --val SOURCES too, or drop it")
    if repeat_input and task not in ("tag", "qa"):
        raise UserError(f"--repeat-input helps a decoder see the right context in tag and qa; {task} does not use it")
    # Options the task would ignore, and still record (a resume would then be refused for them).
    if prompt != DEFAULT_PROMPT and (task != "seq2seq" or cfg.arch != "decoder"):
        raise UserError(f"--prompt formats a decoder's seq2seq input; --task {task} on this {cfg.arch} does not use it: drop it")
    if doc_stride != DEFAULT_DOC_STRIDE and task != "qa":
        raise UserError(f"--doc-stride is the overlap of qa's windows over a long context; {task} does not use it: drop it")
    max_length = min(train.seq_len or cfg.context_length, cfg.context_length)
    fmt = TaskFormat(ckpt.tokenizer, cfg.arch, max_length, prompt, repeat_input)
    task_state: dict[str, Any] = {"kind": task, "max_length": max_length, "prompt": prompt, "doc_stride": doc_stride,
                                  "repeat": repeat_input, "freeze_embeddings": freeze_embeddings,
                                  "freeze_layers": freeze_layers}
    if resume:
        _check_same_settings(out, task_state)

    train_examples = read_examples(task, data, target, text_field=text_field, label_field=label_field,
                                   labels=labels, split_articles=split_articles, part=0)
    if task in ("classify", "tag"):
        labels = labels or label_set(task, train_examples)
    val_examples = None
    if val is not None:
        val_examples = read_examples(task, val, val_target, text_field=text_field, label_field=label_field, labels=labels)
    elif split_articles is not None:
        val_examples = read_examples(task, data, split_articles=split_articles, part=1)
    train_features = featurize(fmt, task, train_examples, labels, doc_stride)
    val_features = featurize(fmt, task, val_examples, labels, doc_stride) if val_examples else None
    for features, source in ((train_features, data), (val_features, val or data)):
        if task == "sft" and features and not any(t != IGNORE_INDEX for f in features for t in f["labels"]):
            raise UserError(f"no conversation in {source} has an assistant token within the first {max_length} tokens; "
                            "nothing to train or validate on: raise --train.seq_len or shorten the conversations")

    if lora is not None and lora.r:
        lora.check_adapts(cfg.mlp)
    new_cfg = cfg.replace(
        task_head=TASK_HEAD[task], labels=labels if task in ("classify", "tag") else None,
        lora=lora if lora is not None and lora.r else None,
        dropout=cfg.dropout if dropout is None else dropout,
    )
    net = _from_base(base, new_cfg, train.seed)
    _freeze(net, freeze_embeddings, freeze_layers)
    objective = TaskObjective(task, cfg.arch, fmt.pad_id, train.seed, train.label_smoothing)
    mean_len = sum(len(f["input_ids"]) + len(f.get("src", ())) for f in train_features) / len(train_features)
    return fit(
        net, objective, ckpt.tokenizer, train, out, train_features, val_features,
        tokens_per_sample=max(round(mean_len), 1),
        resume=resume,
        state={"task": task_state, "base": str(ckpt.path), "data": str(data)},
        describe=(f"{task} on {len(train_examples):,} examples ({len(train_features):,} features)"
                  + (f", {len(val_examples):,} validation examples" if val_examples else "")),
        progress=progress,
        log=log,
        t0=t0,
    )


def _check_same_settings(out: str | Path, task_state: dict[str, Any]) -> None:
    """Refuse to resume a run whose inputs were laid out otherwise (its weights learned the saved layout,
    and its next checkpoints would record this one, which eval and predict would then feed them) or
    that froze other parameters (its optimizer state would not fit, and the error would blame --train)."""
    found = find_checkpoints(out)
    if not found:  # the trainer says there is nothing to resume
        return
    ckpt = load_checkpoint(found[-1])
    saved = (ckpt.trainer_state or {}).get("task")
    if not isinstance(saved, dict):
        return

    def value(k: str, v: Any) -> str:
        return ("on" if v else "off") if isinstance(v, bool) else repr(v) if k == "prompt" else str(v)

    def typed(k: str, v: Any) -> str:  # as the command line spells it
        if isinstance(v, bool):
            return _KEPT_FLAGS[k] if v else f"without {_KEPT_FLAGS[k]}"
        return f"{_KEPT_FLAGS[k]} {value(k, v)}"

    differ = [k for k in _KEPT_FLAGS if k in saved and saved[k] != task_state[k]]
    if differ:  # as a changed --lora.* or --labels is refused (train.checkpointing)
        parts = "; ".join(f"{typed(k, task_state[k])} (saved: {value(k, saved[k])})" for k in differ)
        raise UserError(f"the fine-tuning settings differ from those {ckpt.path} was trained with: {parts}; resume with "
                        f"the same settings ({', '.join(typed(k, saved[k]) for k in differ)})")


def _from_base(base: Transformer, cfg: ModelConfig, seed: int) -> Transformer:
    """A model of config `cfg` holding the base model's weights; new heads and adapters are fresh."""
    torch.manual_seed(seed)
    net = Transformer(cfg)
    state = base.state_dict()
    if base.config.task_head != cfg.task_head or base.config.labels != cfg.labels:
        state = {k: v for k, v in state.items() if not k.startswith("head.")}  # a different head: start it anew
    result = net.load_state_dict(state, strict=False)
    unexpected = list(result.unexpected_keys)
    missing = [k for k in result.missing_keys if not k.startswith("head.") and ".lora_" not in k]
    if missing or unexpected:
        raise UserError(f"the base weights do not fit the fine-tuning model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return net


def _freeze(net: Transformer, embeddings: bool, layers: int) -> None:
    """Set requires_grad for the fine-tune: LoRA trains adapters and head; else all but the frozen.
    An encoder-decoder's first K blocks are those of both stacks: each starts from its own input."""
    stacks = [net.layers] + ([net.encoder_layers] if hasattr(net, "encoder_layers") else [])
    most = min(len(stack) for stack in stacks)
    if layers < 0 or layers > most:
        raise UserError(f"--freeze-layers must be in 0..{most}, got {layers}")
    if net.config.lora is not None and (layers or embeddings):  # LoRA already keeps every base weight fixed
        raise UserError("--freeze-layers and --freeze-embeddings are for a full fine-tune; LoRA already keeps the "
                        "base weights fixed and trains only the adapters and head: drop them, or drop --lora.r")
    if net.config.lora is not None:
        # LoRA: only the adapters and the new task head learn (PEFT's modules_to_save).
        for p in net.parameters():
            p.requires_grad_(False)
        for p in lora_parameters(net) + (list(net.head.parameters()) if net.head is not None else []):
            p.requires_grad_(True)
    else:
        frozen: list[torch.nn.Module] = [block for stack in stacks for block in stack[:layers]]
        if embeddings:
            frozen += [m for m in (net.tok_embeddings, net.pos_embeddings, net.type_embeddings, net.embed_norm) if m is not None]
        for module in frozen:
            for p in module.parameters():
                p.requires_grad_(False)
        if not any(p.requires_grad for p in net.parameters()):  # backward would fail at the first step
            flags = f"--freeze-layers {layers}" + (" and --freeze-embeddings" if embeddings else "")
            raise UserError(f"{flags} leave no weight of this model to train; "
                            "freeze fewer layers, or keep the embeddings trainable")


def merge_lora(checkpoint: str | Path, out: str | Path) -> Path:
    """Write a checkpoint whose weights include the LoRA updates of `checkpoint` (no adapters left)."""
    model, ckpt = load_model(checkpoint, "cpu")
    if model.config.lora is None:
        raise UserError(f"{ckpt.path} has no LoRA adapters to merge; it can be used as it is")
    check_checkpoint_out(out, ckpt.path, checkpoint)  # never over the adapters' own checkpoint or run
    merge_modules(model)
    model.config = model.config.replace(lora=None)
    task = (ckpt.trainer_state or {}).get("task")
    return save_checkpoint(out, model, ckpt.tokenizer, trainer_state={"task": task, "merged_from": str(ckpt.path)} if task else None)

