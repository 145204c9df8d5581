"""Language-model evaluation: loss (nats/token), perplexity and bits per byte over a whole text."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from lmforge.checkpoint import find_checkpoints, load_model
from lmforge.data import iter_documents, load_meta, open_split
from lmforge.data.features import TASK_HEAD
from lmforge.model.losses import lm_loss
from lmforge.model import Transformer
from lmforge.tokenizer import Tokenizer
from lmforge.utils.device import autocast, autocast_dtype, resolve_device
from lmforge.utils.errors import UserError


def evaluate_lm(
    checkpoint: str | Path,
    data: Sequence[str | Path] | str | Path,
    split: str | None = None,
    batch_size: int = 8,
    device: str = "auto",
    dtype: str = "auto",
) -> dict:
    """Loss, perplexity and bits per byte of a checkpoint on a prepared data dir's split (val unless
    `split` says) or on raw files.

    Every token after the first is predicted once, from the tokens before it in its window of
    context_length (non-overlapping windows). `dtype` is the autocast precision (auto: bf16 on
    CUDA, fp32 on CPU); the weights stay fp32.
    """
    if batch_size < 1:
        raise UserError(f"batch_size must be >= 1, got {batch_size}; pass e.g. --batch-size 8")
    paths = [data] if isinstance(data, (str, Path)) else list(data)
    for path in map(Path, paths):
        # Read as text, a run's metrics.jsonl and a checkpoint's JSON would fail on a line of their own.
        if (path / "config.json").is_file() or (path / "metrics.jsonl").is_file() or find_checkpoints(path):
            raise UserError(f"{path} is a checkpoint or run directory, not text to evaluate on; pass --data a prepared "
                            "data directory (lmforge prepare) or text files")
    dev = resolve_device(device)
    amp = autocast_dtype(dev, dtype)
    model, ckpt = load_model(checkpoint, dev)
    if model.config.arch != "decoder":
        raise UserError(
            f"{ckpt.path} is an {model.config.arch} model; eval measures next-token language models "
            "(for encoders and encoder-decoders the training run reports validation loss)"
        )
    if model.config.task_head != "none":  # its language-model head is the base's, not what was fine-tuned
        task = {head: task for task, head in TASK_HEAD.items()}[model.config.task_head]
        raise UserError(f"{ckpt.path} has a {model.config.task_head} head, fine-tuned for --task {task}; score it with "
                        f"`lmforge eval {ckpt.path} --task {task} --data FILE`")
    if len(paths) == 1 and (Path(paths[0]) / "meta.json").exists():
        tokens, n_bytes = _prepared_split(Path(paths[0]), split or "val", ckpt.tokenizer)
    elif split is not None:
        raise UserError(f"--split {split} selects a split of a prepared data directory, and --data names text files; "
                        "leave --split out")
    else:
        tokens, n_bytes = _tokenize_files(paths, ckpt.tokenizer)
    if len(tokens) < 2:
        raise UserError("the evaluation text has fewer than 2 tokens; give more text")
    total_nats, predicted = _sum_nll(model, tokens, batch_size, dev, amp)
    loss = total_nats / predicted
    return {
        "checkpoint": str(ckpt.path),
        "tokens": predicted,
        "bytes": n_bytes,
        "loss": loss,
        "perplexity": math.exp(loss),
        "bpb": total_nats / (n_bytes * math.log(2)),
    }


def _prepared_split(data_dir: Path, split: str, tokenizer: Tokenizer) -> tuple[np.ndarray, int]:
    meta = load_meta(data_dir)
    if meta.get("kind") == "parallel":
        raise UserError(
            f"{data_dir} holds parallel pairs (prepared with --target), and eval measures a language model on token "
            "shards: prepare the text without --target, pass text files, or score translations with "
            "`lmforge eval CKPT --task seq2seq --data SRC --target TGT`"
        )
    if meta["tokenizer_sha256"] != tokenizer.sha256:
        raise UserError(
            f"{data_dir} was prepared with a different tokenizer than the checkpoint's; "
            "pass raw text files instead, or prepare the data with the checkpoint's tokenizer"
        )
    tokens = np.concatenate([np.asarray(s) for s in open_split(data_dir, split)])
    return tokens, int(meta["splits"][split]["bytes"])


def _tokenize_files(paths: Sequence[str | Path], tokenizer: Tokenizer) -> tuple[np.ndarray, int]:
    """The documents' tokens, read as `prepare` reads a corpus, with end-of-text between documents but
    not after the last: its prediction is no part of the text (and an imported chat model's end-of-text
    is its turn end, <|im_end|>), so one file scores as transformers scores its text."""
    ids: list[int] = []
    n_bytes = 0
    for doc in iter_documents(paths):
        if ids:
            ids.append(tokenizer.eot_id)
        ids.extend(tokenizer.encode_batch([doc.text], eot_only=True)[0])
        n_bytes += len(doc.text.encode("utf-8"))
    if n_bytes == 0:
        raise UserError(f"no text found in {', '.join(map(str, paths))}; give non-empty text files")
    return np.asarray(ids, dtype=np.int64), n_bytes


@torch.no_grad()
def _sum_nll(
    model: Transformer, tokens: np.ndarray, batch_size: int, device: torch.device, amp: torch.dtype | None
) -> tuple[float, int]:
    """Summed next-token NLL (nats) and the number of predicted tokens."""
    T = model.config.context_length
    n_full = (len(tokens) - 1) // T
    windows = [tokens[s : s + T + 1] for s in range(0, n_full * T, T)]
    batches = [np.stack(windows[i : i + batch_size]) for i in range(0, n_full, batch_size)]
    if len(tokens) - n_full * T >= 2:
        batches.append(tokens[n_full * T :][None])  # the final, shorter window
    total, count = 0.0, 0
    for batch in batches:
        chunk = torch.from_numpy(batch.astype(np.int64)).to(device)
        with autocast(device, amp):
            logits = model(chunk[:, :-1])
        n = chunk[:, 1:].numel()
        total += lm_loss(logits, chunk[:, 1:], vocab_size=model.config.vocab_size).item() * n
        count += n
    return total, count
