"""A preallocated key/value cache, passed to the model rather than hidden inside it.

Buffers have a fixed shape (batch, heads, max_seq_len, head_size) per layer, so a decode step
writes in place and never reallocates (what CUDA graphs and continuous batching need).

Rows are slots: with `start` a tensor (B,) every row writes at its own position, so sequences
of different lengths share one decode step; `rows(lo, hi, length)` is a view of some slots (and
of their first positions) that shares
the buffers (a slot's prefill writes straight into the batch cache), and `reorder` permutes
rows in place (beam search).
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(
        self,
        n_layer: int,
        batch_size: int,
        max_seq_len: int,
        n_head: int,
        head_size: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        shape = (n_layer, batch_size, n_head, max_seq_len, head_size)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_seq_len = max_seq_len

    @property
    def batch_size(self) -> int:
        return self.k.size(1)

    def update(
        self, layer: int, start: int | torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, nh, T, hs) at positions [start, start+T) and return the keys/values to attend to.

        With an int `start`: every row at the same positions; returns positions [0, start+T).
        With a tensor `start` (B,): row b at [start[b], start[b]+T); returns all max_seq_len
        positions (the caller masks each row's keys past its own position). The caller keeps
        start + T <= max_seq_len; a tensor start is not checked (that would sync a GPU).
        """
        T = k.size(2)
        if isinstance(start, torch.Tensor):
            B, nh, _, hs = k.shape
            pos = (start[:, None] + torch.arange(T, device=k.device)).view(B, 1, T, 1).expand(B, nh, T, hs)
            self.k[layer].scatter_(2, pos, k)
            self.v[layer].scatter_(2, pos, v)
            return self.k[layer], self.v[layer]
        end = start + T
        if end > self.max_seq_len:
            raise ValueError(f"KV cache holds {self.max_seq_len} positions; asked to write up to {end}")
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def rows(self, lo: int, hi: int, length: int | None = None) -> KVCache:
        """A cache over slots [lo, hi) and positions [0, length) that shares this one's memory:
        writes to it land here (a decode step attends over the first `length` positions only)."""
        n = self.max_seq_len if length is None else min(length, self.max_seq_len)
        view = KVCache.__new__(KVCache)
        view.k, view.v, view.max_seq_len = self.k[:, lo:hi, :, :n], self.v[:, lo:hi, :, :n], n
        return view

    def reorder(self, index: torch.Tensor) -> None:
        """Row b becomes old row index[b] (in place: the buffers keep their addresses)."""
        self.k.copy_(self.k.index_select(1, index))
        self.v.copy_(self.v.index_select(1, index))
