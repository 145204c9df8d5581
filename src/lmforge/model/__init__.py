"""Blocks, architectures and the KV cache (layer 2: imports only config and utils)."""

from lmforge.model.cache import KVCache
from lmforge.model.transformer import Transformer

__all__ = ["KVCache", "Transformer"]
