"""Corpus reading, tokenizer training, token shards and task data (layer 3)."""

from lmforge.data.corpus import Document, iter_documents, train_tokenizer
from lmforge.data.parallel import prepare_parallel, read_parallel
from lmforge.data.prepare import load_meta, open_split, prepare
from lmforge.data.tasks import (
    ChatExample,
    ClassifyExample,
    QAExample,
    TaggedExample,
    Text2TextExample,
    read_chat,
    read_classification,
    read_parallel_text,
    read_squad,
    read_tagged,
    read_text2text,
    split_by_article,
)

__all__ = [
    "ChatExample",
    "ClassifyExample",
    "Document",
    "QAExample",
    "TaggedExample",
    "Text2TextExample",
    "iter_documents",
    "load_meta",
    "open_split",
    "prepare",
    "prepare_parallel",
    "read_chat",
    "read_classification",
    "read_parallel",
    "read_parallel_text",
    "read_squad",
    "read_tagged",
    "read_text2text",
    "split_by_article",
    "train_tokenizer",
]
