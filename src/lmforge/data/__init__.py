"""Corpus reading, tokenizer training and token shards (layer 3)."""

from lmforge.data.corpus import Document, iter_documents, train_tokenizer
from lmforge.data.parallel import prepare_parallel, read_parallel
from lmforge.data.prepare import load_meta, open_split, prepare

__all__ = ["Document", "iter_documents", "train_tokenizer", "prepare", "load_meta", "open_split", "prepare_parallel", "read_parallel"]
