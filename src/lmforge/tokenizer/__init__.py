"""Byte-level BPE tokenizer (layer 2): trains, saves and loads one `tokenizer.json`."""

from lmforge.tokenizer.bpe import GENERATION_FILE, SPECIAL_TOKENS, ChatTemplateError, Tokenizer

__all__ = ["ChatTemplateError", "GENERATION_FILE", "Tokenizer", "SPECIAL_TOKENS"]
