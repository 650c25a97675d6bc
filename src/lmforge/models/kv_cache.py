"""The KV cache: preallocated keys and values for a fixed number of sequence slots.

Design choices:
- Memory is allocated once, `(n_slots, n_kv_heads, capacity, head_dim)` per layer; decoding
  writes in place and never grows or copies the cache.
- Slots are independent sequences. A forward pass works on a contiguous range of slots
  (`cache.view(start, stop)`), so a server can prefill a new request in one slot while the
  others keep their state, and decode all active slots together.
- Every stored key keeps its absolute position (`key_pos`, -1 for empty). Attention masks
  are built from positions, so causality, ragged batch lengths and sliding windows need no
  special cases.
- Sliding-window models get a rolling cache of `window` columns: position p lives in column
  p % window. Keys are stored after rotary rotation, so their order in the buffer does not
  matter. `spare` extra columns keep keys that a rollback may need again (speculative
  decoding writes k draft tokens that can be rejected). A multi-token step on a rolling cache attends over the old columns plus the new
  keys before the new ones overwrite the oldest, so no needed key is lost.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lmforge.config import ModelConfig
from lmforge.errors import LmforgeError


class KVCache:
    """Keys and values of `n_slots` sequences for every layer of one model."""

    def __init__(
        self,
        config: ModelConfig,
        n_slots: int,
        *,
        capacity: int | None = None,
        spare: int = 0,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        capacity = min(capacity or config.max_seq_len, config.max_seq_len)
        window = config.sliding_window
        self.rolling = window is not None and window + spare < capacity
        self.capacity = window + spare if self.rolling else capacity
        shape = (n_slots, config.n_kv_heads, self.capacity, config.head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layers)]
        self.key_pos = torch.full((n_slots, self.capacity), -1, dtype=torch.long, device=device)
        self.n_slots = n_slots
        self.max_positions = capacity  # longest sequence a slot can hold

    def reset(self, start: int = 0, stop: int | None = None) -> None:
        """Forget the sequences in slots [start, stop)."""
        self.key_pos[start:stop] = -1

    def rollback(self, slot: int, length: int) -> None:
        """Forget every token of `slot` from position `length` on (rejected speculative tokens)."""
        row = self.key_pos[slot]
        row[row >= length] = -1

    def reorder(self, order: Tensor) -> None:
        """Slot i takes the contents of slot order[i] (beam search)."""
        for layer in range(len(self.keys)):
            self.keys[layer][: len(order)] = self.keys[layer][order]
            self.values[layer][: len(order)] = self.values[layer][order]
        self.key_pos[: len(order)] = self.key_pos[order]

    def view(self, start: int = 0, stop: int | None = None) -> CacheView:
        """The slots [start, stop) as the cache of one forward pass."""
        stop = self.n_slots if stop is None else stop
        if not 0 <= start < stop <= self.n_slots:
            raise ValueError(f"slots [{start}, {stop}) are outside the cache's {self.n_slots} slots")
        return CacheView(self, start, stop)

    def lengths(self) -> Tensor:
        """Tokens seen so far by each slot (max stored position + 1)."""
        return self.key_pos.max(dim=1).values + 1  # (n_slots,)


class CacheView:
    """The cache of one forward pass: `prepare` plans the write, layers call `update`."""

    def __init__(self, cache: KVCache, start: int, stop: int) -> None:
        self.cache, self.rows = cache, slice(start, stop)
        self._concat = False

    def prepare(self, positions: Tensor) -> Tensor:
        """Plan storing tokens at `positions` (B, T); return the key positions (B, S) queries will see."""
        c = self.cache
        if int(positions.max()) >= c.max_positions:
            raise LmforgeError(
                f"sequence of {int(positions.max()) + 1} tokens exceeds the cache of {c.max_positions}; "
                "generate fewer tokens or use a model with a longer context"
            )
        T = positions.shape[1]
        old = c.key_pos[self.rows]  # (B, capacity)
        self._concat = c.rolling and T > 1
        keep = positions[:, -c.capacity :]  # the newest tokens are the ones that stay in a rolling cache
        self._write_cols = keep % c.capacity  # (B, T') column of each stored token
        self._keep_from = T - keep.shape[1]
        new_pos = old.scatter(1, self._write_cols, keep)
        self._new_pos = new_pos
        if self._concat:
            return torch.cat((old, positions), dim=1)  # (B, capacity + T)
        self._used = int((new_pos >= 0).any(0).nonzero().max()) + 1
        return new_pos[:, : self._used]

    def buffers(self, layer: int) -> tuple[Tensor, Tensor]:
        """This pass's slots of the layer's key and value buffers (B, n_kv_heads, capacity, head_dim),
        for a caller that stores each token at `columns` itself (the native decode attention)."""
        return self.cache.keys[layer][self.rows], self.cache.values[layer][self.rows]

    @property
    def columns(self) -> Tensor:
        """(B, T') the buffer column of each token this pass stores (the newest T' <= T of them)."""
        return self._write_cols

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store this layer's new keys/values (B, n_kv_heads, T, head_dim); return what to attend over."""
        ck, cv = self.buffers(layer)
        if self._concat:
            k_all, v_all = torch.cat((ck, k), dim=2), torch.cat((cv, v), dim=2)
        idx = self._write_cols[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])  # (B, n_kv_heads, T', head_dim)
        ck.scatter_(2, idx, k[:, :, self._keep_from :])
        cv.scatter_(2, idx, v[:, :, self._keep_from :])
        if self._concat:
            return k_all, v_all
        return ck[:, :, : self._used], cv[:, :, : self._used]

    def commit(self) -> None:
        """Record the positions of the stored tokens; call once after all layers updated."""
        self.cache.key_pos[self.rows] = self._new_pos
