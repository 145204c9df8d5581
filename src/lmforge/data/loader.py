"""Training batches from token shards: random windows that are a pure function of (seed, step).

Because batch `step` depends on nothing but the seed and the step number, a resumed run sees
exactly the batches an uninterrupted one would, with no sampler state to save.
"""

from __future__ import annotations

import queue
import threading
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from lmforge.utils.errors import UserError


class TokenWindows:
    """Windows of seq_len + 1 tokens (inputs and shifted targets) over a list of 1-D token arrays."""

    def __init__(self, shards: list[np.ndarray], seq_len: int, split: str = "train") -> None:
        self.shards = shards
        self.seq_len = seq_len
        # Number of valid window starts in each shard, and their running total.
        counts = [max(len(s) - seq_len, 0) for s in shards]
        if sum(counts) == 0:
            longest = max((len(s) for s in shards), default=0)
            raise UserError(
                f"the {split} split has {longest} tokens in its longest shard, too few for sequences of "
                f"{seq_len}; lower --train.seq_len or prepare more text"
            )
        self.cumulative = np.cumsum([0] + counts)
        self._document_ends: tuple[int, list[np.ndarray], np.ndarray] | None = None

    @property
    def num_windows(self) -> int:
        return int(self.cumulative[-1])

    def locate(self, starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The shard of each global window start, and the window's offset in that shard."""
        shard = np.searchsorted(self.cumulative, starts, side="right") - 1
        return shard, np.asarray(starts) - self.cumulative[shard]

    def windows(self, starts: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets (B, seq_len) int64 for global window starts."""
        shards, offsets = self.locate(starts)
        rows = [self.shards[s][o : o + self.seq_len + 1] for s, o in zip(shards.tolist(), offsets.tolist())]
        chunk = torch.from_numpy(np.stack(rows).astype(np.int64))
        return chunk[:, :-1], chunk[:, 1:]

    def document_ids(self, starts: np.ndarray, eot_id: int, offset: int = 0) -> np.ndarray:
        """A number for the document that holds token `offset` of each window, equal for tokens of one
        document. `prepare` ends every document with the end-of-text token `eot_id`; the first call
        finds those tokens (one pass over the split, in chunks) and later calls reuse them."""
        if self._document_ends is None or self._document_ends[0] != eot_id:
            ends = [_positions_of(shard, eot_id) for shard in self.shards]
            # Document numbers continue across shards: shard s starts after the documents of the shards before it.
            first = np.cumsum([0] + [len(e) + 1 for e in ends])
            self._document_ends = (eot_id, ends, first)
        _, ends, first = self._document_ends
        shards, offsets = self.locate(starts)
        positions = offsets + offset
        # An end-of-text token belongs to the document it ends (side="left": the ends strictly before it).
        return np.array(
            [first[s] + np.searchsorted(ends[s], p, side="left") for s, p in zip(shards.tolist(), positions.tolist())],
            dtype=np.int64,
        )

    def random_batch(self, batch_size: int, seed: int, step: int, micro: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch number (step, micro) of a run seeded with `seed`."""
        rng = np.random.default_rng([seed, step, micro])
        return self.windows(rng.integers(0, self.num_windows, size=batch_size))

    def spread_batches(self, batch_size: int, n_batches: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """`n_batches` fixed batches whose windows are spread evenly over the split (for validation)."""
        n = min(batch_size * n_batches, self.num_windows)
        starts = np.linspace(0, self.num_windows - 1, n).astype(np.int64)
        return [self.windows(starts[i : i + batch_size]) for i in range(0, n, batch_size)]


def _positions_of(tokens: np.ndarray, token: int, chunk: int = 1 << 26) -> np.ndarray:
    """Sorted positions of `token` in a (memory-mapped) array, read a chunk at a time so that the
    comparison never holds a whole shard's worth of booleans."""
    found = [np.flatnonzero(np.asarray(tokens[i : i + chunk]) == token) + i for i in range(0, len(tokens), chunk)]
    return np.concatenate(found) if found else np.zeros(0, dtype=np.int64)


class Prefetcher:
    """Batches made ahead on a background thread, handed out in a fixed order.

    `make(*key)` builds the batch for each key of `keys` in turn (for training, key = (step, micro)),
    so what the consumer gets is exactly what calling `make` itself would give: prefetching changes
    when a batch is built, never which. With `pin`, tensors are put in pinned memory so that a
    `.to(cuda, non_blocking=True)` copy overlaps with compute.
    """

    def __init__(self, make: Callable[..., dict[str, torch.Tensor]], keys: Iterable[tuple], depth: int = 4, pin: bool = False) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=max(depth, 1))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, args=(make, iter(keys), pin), name="lmforge-prefetch", daemon=True)
        self._thread.start()

    def _fill(self, make: Callable[..., dict[str, torch.Tensor]], keys: Iterator[tuple], pin: bool) -> None:
        try:
            for key in keys:
                batch = make(*key)
                if pin:
                    # Contiguous first: a strided pinned tensor is copied to the device through a pageable temporary.
                    batch = {k: v.contiguous().pin_memory() for k, v in batch.items()}
                if not self._put((key, batch)):
                    return
        except BaseException as e:  # handed to the consumer, which raises it in the training thread
            self._put((None, e))
            return
        self._put((None, None))

    def _put(self, item: tuple) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def next(self, key: tuple) -> dict[str, torch.Tensor]:
        """The batch for `key`, which must be the next key of the order given at construction."""
        got, batch = self._queue.get()
        if got is None:
            if isinstance(batch, BaseException):
                raise batch
            raise RuntimeError("the prefetcher ran out of keys")
        if got != key:
            raise RuntimeError(f"prefetcher out of order: expected {key}, made {got}")
        return batch

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
