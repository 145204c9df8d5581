"""The checkpoint directory: the one hand-off format between stages (layer 3).

    CKPT/
      config.json          {"format": 1, "model": {...ModelConfig...}}
      model.safetensors    weights (tied weights stored once)
      tokenizer.json       the tokenizer the model was trained with
      trainer_state.json   training runs only: step, configs, RNG-free data position, optimizer layout
      optimizer.safetensors  training runs only: optimizer tensors
      metrics.jsonl        training runs only: the metrics up to this step
      generation_config.json  imported from Hugging Face only: transformers' generate defaults,
                           kept for `export hf` (lmforge does not read them)
      dcp/                 multi-process training runs only: model and optimizer state, sharded
                           (torch.distributed.checkpoint; what --resume reads on any world size)

A training run writes `RUN/step-000100/`, `RUN/step-000200/`, ...; anything that takes a checkpoint
also takes the run directory and uses its latest complete step.
"""

from lmforge.checkpoint.store import (
    CKPT_FIX,
    Checkpoint,
    check_checkpoint_out,
    check_run_out,
    find_checkpoints,
    is_hf_config,
    load_checkpoint,
    load_model,
    resolve_checkpoint,
    save_checkpoint,
)

__all__ = [
    "CKPT_FIX",
    "Checkpoint",
    "check_checkpoint_out",
    "check_run_out",
    "find_checkpoints",
    "is_hf_config",
    "load_checkpoint",
    "load_model",
    "resolve_checkpoint",
    "save_checkpoint",
]
