"""Byte-level BPE tokenizer (layer 2): trains, saves and loads one `tokenizer.json`."""

from lmforge.tokenizer.bpe import SPECIAL_TOKENS, Tokenizer

__all__ = ["Tokenizer", "SPECIAL_TOKENS"]
