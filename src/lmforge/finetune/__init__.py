"""Fine-tuning workflows (layer 4): task heads, LoRA and the shared training loop on task data."""

from lmforge.finetune.run import finetune, merge_lora

__all__ = ["finetune", "merge_lora"]
