"""Byte-level BPE tokenizer (layer 2): trains, saves and loads one `tokenizer.json`."""

from lmforge.tokenizer.bpe import SPECIAL_TOKENS, ChatTemplateError, Tokenizer

__all__ = ["ChatTemplateError", "Tokenizer", "SPECIAL_TOKENS"]
