"""Fine-tuning workflows (layer 4): task heads, LoRA and the shared training loop on task data."""

import sys
import types

from lmforge.finetune.run import finetune, merge_lora

__all__ = ["finetune", "merge_lora"]


class _CallablePackage(types.ModuleType):
    """`lmforge.finetune` names both this package and the verb. Importing a package binds it over its
    parent's attribute of the same name, so the function `lmforge.finetune` of the first call would
    become this module on the next; instead the package itself runs the verb when called."""

    def __call__(self, *args, **kwargs):
        return finetune(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
__wrapped__ = finetune  # inspect.signature and IDEs show the verb's parameters
