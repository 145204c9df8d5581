"""How to train: optimizer, schedule, batch, logging and checkpoint cadence, device."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal, get_args

from lmforge.config.model import check_finite, check_scalar_types
from lmforge.utils.errors import UserError


CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]
COMPILE_MODES: tuple[str, ...] = get_args(CompileMode)


@dataclass
class TrainConfig:
    """Pretraining settings.

    Args:
        max_steps: optimizer steps in the run (the cosine schedule ends here).
        batch_size: sequences per micro-batch.
        grad_accum: micro-batches per optimizer step; tokens/step = batch_size * grad_accum * seq_len.
        seq_len: tokens per sequence; None means the model's context_length.
        optim: `adamw`, or `muon`: Muon (Jordan et al. 2024; Newton-Schulz-orthogonalised Nesterov
            momentum) on the blocks' weight matrices and AdamW (lr, betas, weight_decay) on the rest:
            embeddings, output head, norms, biases. Muon's matrices take no weight decay.
        muon_lr: Muon's peak learning rate; the schedule scales it by the same factor as lr.
        muon_momentum: Muon's (Nesterov) momentum.
        chunked_loss: compute the causal LM loss over chunks of this many tokens with the output
            head inside each chunk, so that logits for the whole batch never exist at once (memory
            for large vocabularies); 0 computes all logits at once.
        label_smoothing: train every cross-entropy against a target of 1 - e on the label and e / K
            spread over all K classes (Szegedy et al. 2016; "Attention Is All You Need" uses 0.1 for
            translation). Validation losses stay plain cross-entropy, comparable across runs.
        lr: peak learning rate.
        min_lr: learning rate at the end of the cosine decay.
        warmup_steps: steps of linear warmup from 0 to lr.
        weight_decay: AdamW decay on matrices (never on norms, biases or embeddings).
        beta1: AdamW beta1.
        beta2: AdamW beta2.
        grad_clip: clip the global gradient norm to this; 0 disables clipping (the norm is still measured and checked).
        eval_interval: validate every this many steps (and at the end); 0 disables.
        eval_batches: micro-batches of validation data per evaluation.
        log_interval: write training metrics every this many steps.
        ckpt_interval: write a checkpoint every this many steps (and at the end); 0 only at the end.
        keep_checkpoints: how many step checkpoints to keep (oldest are deleted).
        seed: seeds weights, data order and dropout; a run is a function of its config.
        device: `auto` (CUDA if present, else CPU), `cpu`, `cuda`, `cuda:1`, ...
        dtype: `auto` (bf16 autocast on CUDA, fp32 on CPU), `float32`, `bfloat16`.
        compile: torch.compile the model; None means on for CUDA, off for CPU.
        compile_mode: torch.compile's mode. `reduce-overhead` also captures the forward and backward
            in CUDA graphs, which saves the kernel launches (every step must have the same batch
            shape, as pretraining's do). `max-autotune` searches matmul kernels too, with CUDA graphs;
            `max-autotune-no-cudagraphs` searches without them. The first compile takes minutes.
        fp8: float8 matmuls in the blocks' linear layers through torchao (dynamic per-tensor
            scales; weights, optimizer and checkpoint keep their dtype): for GPUs with FP8 tensor
            cores (H100, L4). The output head, embeddings, LoRA layers and dimensions not divisible
            by 16 stay as they are. `bench/train_throughput.py --fp8 --loss-check` compares the loss.
        threads: CPU threads for torch; None keeps torch's default.
        tensorboard: also write TensorBoard event files.
        parallel: under torchrun, `ddp` (every process holds the whole model) or `fsdp` (FSDP2,
            parameters, gradients and optimizer state sharded over the processes); ignored for one process.
            Each step takes batch_size * grad_accum * processes sequences.
        skip_nonfinite: skip a step whose loss is nan or inf (its gradients are dropped) instead of
            stopping the run; on CUDA this costs one host sync per step.
    """

    max_steps: int = 1000
    batch_size: int = 32
    grad_accum: int = 1
    seq_len: int | None = None
    optim: Literal["adamw", "muon"] = "adamw"
    muon_lr: float = 0.02
    muon_momentum: float = 0.95
    chunked_loss: int = 0
    label_smoothing: float = 0.0
    lr: float = 6e-4
    min_lr: float = 6e-5
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_interval: int = 250
    eval_batches: int = 20
    log_interval: int = 10
    ckpt_interval: int = 500
    keep_checkpoints: int = 2
    seed: int = 1337
    device: str = "auto"
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    compile: bool | None = None
    compile_mode: CompileMode = "default"
    fp8: bool = False
    threads: int | None = None
    tensorboard: bool = True
    parallel: Literal["ddp", "fsdp"] = "ddp"
    skip_nonfinite: bool = False

    def __post_init__(self) -> None:
        check_scalar_types(type(self), vars(self), "train")  # TrainConfig(max_steps="3") in Python: not a TypeError later
        check_finite(self, "train")
        for name in ("max_steps", "batch_size", "grad_accum", "log_interval", "keep_checkpoints", "eval_batches"):
            if getattr(self, name) < 1:
                raise UserError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        # Far above any real run, and below where numpy and torch overflow on a batch's size (a traceback);
        # max_steps: the loop tracks the first non-finite step in float64, exact up to 2**53.
        limits = {"max_steps": 2**53, "batch_size": 2**20, "grad_accum": 2**20, "eval_batches": 2**20, "seq_len": 2**24,
                  "threads": 4096}
        for name, limit in limits.items():
            if getattr(self, name) is not None and getattr(self, name) > limit:
                raise UserError(f"train.{name} must be <= {limit:,}, got {getattr(self, name):,}")
        for name in ("warmup_steps", "eval_interval", "ckpt_interval", "weight_decay", "grad_clip"):
            if getattr(self, name) < 0:
                raise UserError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise UserError(f"need 0 <= train.min_lr <= train.lr and lr > 0, got lr={self.lr} min_lr={self.min_lr}")
        if self.parallel not in ("ddp", "fsdp"):
            raise UserError(f"train.parallel must be ddp or fsdp, got {self.parallel!r}")
        if self.optim not in ("adamw", "muon"):
            raise UserError(f"train.optim={self.optim!r} is not supported; use one of ['adamw', 'muon']")
        if self.muon_lr <= 0 or not 0.0 <= self.muon_momentum < 1.0:
            raise UserError(f"need train.muon_lr > 0 and 0 <= train.muon_momentum < 1, got {self.muon_lr}, {self.muon_momentum}")
        if self.compile_mode not in COMPILE_MODES:
            raise UserError(f"train.compile_mode must be one of {list(COMPILE_MODES)}, got {self.compile_mode!r}")
        if self.chunked_loss < 0:
            raise UserError(f"train.chunked_loss must be >= 0 (0 turns it off), got {self.chunked_loss}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise UserError(f"train.label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.seq_len is not None and self.seq_len < 1:
            raise UserError(f"train.seq_len must be >= 1, got {self.seq_len}")
        if self.threads is not None and self.threads < 1:
            raise UserError(f"train.threads must be >= 1, got {self.threads}")
        if not 0 <= self.seed < 2**63:
            raise UserError(f"train.seed must be in [0, 2**63), got {self.seed}")
        if not (0.0 <= self.beta1 < 1.0 and 0.0 <= self.beta2 < 1.0):
            raise UserError(f"train.beta1 and train.beta2 must be in [0, 1), got {self.beta1} and {self.beta2}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def of(cls, value: TrainConfig | dict[str, Any] | None, defaults: dict[str, Any] | None = None) -> TrainConfig:
        """The config a Python caller means by `train=`: a TrainConfig as it is; a dict of fields over
        `defaults` (a fine-tune's are FINETUNE_DEFAULTS); None, the defaults alone."""
        if isinstance(value, cls):
            return value
        if value is not None and not isinstance(value, dict):
            raise UserError(f"train must be a TrainConfig or a dict of its fields, got {type(value).__name__}")
        unknown = sorted(set(value or {}) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise UserError(f"unknown train field(s) {unknown}; valid fields are {sorted(f.name for f in dataclasses.fields(cls))}")
        return cls(**{**(defaults or {}), **(value or {})})


# Fine-tuning starts from trained weights: a small learning rate decayed to zero, a short warmup,
# light weight decay, one checkpoint at the end (the values `lmforge finetune` defaults to). Task
# batches are padded to their longest example, so every batch has a new shape: torch.compile
# would recompile for each, hence off unless asked for.
FINETUNE_DEFAULTS: dict[str, Any] = dict(
    max_steps=500, batch_size=16, lr=5e-5, min_lr=0.0, warmup_steps=50, weight_decay=0.01,
    eval_interval=100, eval_batches=20, ckpt_interval=0, keep_checkpoints=1, compile=False,
)
# How a fine-tune lays its inputs out, unless told otherwise: a decoder's seq2seq prompt, and the
# overlap in tokens of QA's windows over a long context (as transformers' question-answering examples).
DEFAULT_PROMPT = "{source}\n\n"
DEFAULT_DOC_STRIDE = 128
# How a fine-tuned checkpoint predicts, unless told otherwise (predict, eval --task, lmforge.pipeline), and the
# tasks each option applies to: generation to seq2seq and sft, the longest answer span to qa.
INFERENCE_DEFAULTS: dict[str, Any] = dict(max_new_tokens=64, num_beams=1, length_penalty=1.0, max_answer_length=30)
INFERENCE_TASKS = {"max_new_tokens": ("seq2seq", "sft"), "num_beams": ("seq2seq", "sft"),
                   "length_penalty": ("seq2seq", "sft"), "max_answer_length": ("qa",)}
