"""A preallocated key/value cache, passed to the model rather than hidden inside it.

Buffers have a fixed shape (batch, heads, max_seq_len, head_size) per layer, so a decode step
writes in place and never reallocates (what CUDA graphs and continuous batching need).

Rows are slots: with `start` a tensor (B,) every row writes at its own position, so sequences
of different lengths share one decode step; `rows(lo, hi, length)` is a view of some slots (and
of their first positions) that shares the buffers (a slot's prefill writes straight into the
batch cache), `spanning(length)` attends over fewer positions of the very same buffers (a
compiled step's length buckets), and `reorder` permutes rows in place (beam search).
"""

from __future__ import annotations

import copy

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
        # One buffer per layer, not one (n_layer, ...) tensor: under torch.compile a write into a
        # buffer that is itself a graph input happens in place, while a write into a slice of a
        # bigger input makes the compiled step copy that layer's whole cache at every token.
        shape = (batch_size, n_head, max_seq_len, head_size)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.max_seq_len = max_seq_len
        self.span = max_seq_len  # the positions a forward with per-row starts attends over
        self._bound: tuple | None = None  # (start, T, write index, mask): see `rows`

    @property
    def batch_size(self) -> int:
        return self.k[0].size(0)

    def update(
        self, layer: int, start: int | torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, nh, T, hs) at positions [start, start+T) and return the keys/values to attend to.

        With an int `start`: every row at the same positions; returns positions [0, start+T).
        With a tensor `start` (B,): row b at [start[b], start[b]+T); returns the first `span`
        positions (the caller masks each row's keys past its own position). The caller keeps
        start + T <= span; a tensor start is not checked (that would sync a GPU).
        """
        T = k.size(2)
        if isinstance(start, torch.Tensor):
            index = self._per_row(start, T)[0]  # (B, nkv, T, hs)
            k_all, v_all = self.k[layer], self.v[layer]
            if torch.compiler.is_compiling():
                # The compiled step writes an index_put_ in place, but a scatter_ by copying the
                # layer's whole cache; eager, the scatter_ is the cheaper call (1 us against 3).
                rows, pos = torch.arange(k.size(0), device=k.device)[:, None], index[:, 0, :, 0]  # (B, 1), (B, T)
                k_all[rows, :, pos] = k.transpose(1, 2)  # (B, T, nkv, hs) into rows x positions
                v_all[rows, :, pos] = v.transpose(1, 2)
            else:
                k_all.scatter_(2, index, k)
                v_all.scatter_(2, index, v)
            if self.span < self.max_seq_len:
                return k_all[:, :, : self.span], v_all[:, :, : self.span]
            return k_all, v_all
        end = start + T
        if end > self.max_seq_len:
            raise ValueError(f"KV cache holds {self.max_seq_len} positions; asked to write up to {end}")
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def rows(self, lo: int, hi: int, length: int | None = None, start: torch.Tensor | None = None, T: int = 1) -> KVCache:
        """A cache over slots [lo, hi) and positions [0, length) that shares this one's memory:
        writes to it land here (a decode step attends over the first `length` positions only).

        Given the per-row `start` (hi - lo,) of the next forward of `T` tokens, the view works out
        once what every layer of that forward needs: where to write and what to mask.
        """
        n = self.max_seq_len if length is None else min(length, self.max_seq_len)
        view = KVCache.__new__(KVCache)
        view.k, view.v = [t[lo:hi, :, :n] for t in self.k], [t[lo:hi, :, :n] for t in self.v]
        view.max_seq_len, view.span, view._bound = n, n, None
        if start is not None:
            view._bound = (start, T, *view._positions(start, T))
        return view

    def spanning(self, length: int) -> KVCache:
        """The same buffers (the same tensor objects: a compiled step sees the same inputs and a
        CUDA graph the same addresses), but a forward with per-row starts attends over the first
        `length` positions only; writes still go anywhere in the buffers."""
        view = copy.copy(self)
        view.span, view._bound = min(length, self.max_seq_len), None
        return view

    def attention_mask(self, start: torch.Tensor, T: int) -> torch.Tensor:
        """Additive mask (B, 1, T, span) for per-row starts: row b's query i (at start[b] + i)
        sees keys 0..start[b]+i (0), not the later ones, stale or unwritten (-inf)."""
        return self._per_row(start, T)[1]

    def _per_row(self, start: torch.Tensor, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        bound = self._bound
        if bound is not None and bound[0] is start and bound[1] == T:
            return bound[2], bound[3]
        return self._positions(start, T)

    def _positions(self, start: torch.Tensor, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The write index (B, nkv, T, hs) and the additive mask (B, 1, T, S) for per-row starts."""
        B, nkv, _, hs = self.k[0].shape
        S = self.span
        q = start[:, None] if T == 1 else start[:, None] + torch.arange(T, device=start.device)  # (B, T): query positions
        index = q.view(B, 1, T, 1).expand(B, nkv, T, hs)
        late = torch.arange(S, device=start.device) > q[:, None, :, None]  # (B, 1, T, S)
        mask = torch.zeros(late.shape, dtype=self.k[0].dtype, device=start.device).masked_fill_(late, float("-inf"))
        return index, mask

    def reorder(self, index: torch.Tensor) -> None:
        """Row b becomes old row index[b] (in place: the buffers keep their addresses)."""
        for t in self.k + self.v:
            t.copy_(t.index_select(0, index))
