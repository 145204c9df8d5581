"""Conversion to and from other ecosystems' formats (layer 3). One mapping table per family."""

from lmforge.interop.hf import export_hf, import_hf

__all__ = ["export_hf", "import_hf"]
