"""lmforge: Transformer language models from theory to practice.

    import lmforge
    lm = lmforge.load("runs/demo/run")          # a checkpoint or a run directory
    print(lm.generate("ROMEO:", max_new_tokens=50, temperature=0.8, seed=0))

The verbs of the `lmforge` command are functions here too: `train_tokenizer`, `prepare`,
`pretrain`, `finetune`, `merge_lora`, `pipeline`, `predict`, `evaluate_lm`, `evaluate_task`, `load`. They are imported on first use, so `import lmforge` is cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "load": "lmforge.infer",
    "LanguageModel": "lmforge.infer",
    "train_tokenizer": "lmforge.data",
    "prepare": "lmforge.data",
    "pretrain": "lmforge.train",
    "finetune": "lmforge.finetune",
    "merge_lora": "lmforge.finetune",
    "pipeline": "lmforge.infer",
    "predict": "lmforge.infer",
    "evaluate_task": "lmforge.evaluate",
    "evaluate_lm": "lmforge.evaluate",
    "ModelConfig": "lmforge.config",
    "TrainConfig": "lmforge.config",
    "preset": "lmforge.config",
    "UserError": "lmforge.utils.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        module = importlib.import_module(_EXPORTS[name])
        # `finetune` is also a subpackage: its import bound lmforge.finetune to that (callable) package,
        # which stays the answer to every later access, so the first one gets it too.
        return globals().get(name) or getattr(module, name)
    raise AttributeError(f"module 'lmforge' has no attribute {name!r}")
