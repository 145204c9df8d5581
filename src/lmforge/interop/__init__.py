"""Conversion to and from other ecosystems' formats (layer 3). One mapping table per family."""

from lmforge.interop.gguf import import_gguf, read_gguf
from lmforge.interop.hf import export_hf, import_hf

__all__ = ["export_hf", "import_gguf", "import_hf", "read_gguf"]
