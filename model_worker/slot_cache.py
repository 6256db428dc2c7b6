"""The forward's cache: a transformers `Cache` whose layers write the new tokens' K/V in place.

A replica keeps its rows in slots [first, first + n) of buffers [L, H, S, D] (rotated keys and
values, cache_authority/rows.py). A forward of q new tokens writes their K/V into the free slots
[first + n, first + n + q) right after the live rows — never into a live row — and attends to
views of [first, first + n + q): no `torch.cat` of the whole cache per layer and no copy of the
rows (gpt-fast's `KVCache.update` writing into preallocated buffers; Hugging Face's DynamicLayer
concatenates instead). The slots written are free: the next commit that reaches them overwrites
them, and no live row, digest or mirror entry changes (DESIGN.md invariant 1).

One `SlotCache` serves one forward pass: transformers 5.x calls `cache.update(k, v, layer_idx)`
once per layer and reads nothing else from it when the attention mask is given as 4-D (forward.py
always gives one).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


class SlotLayer(CacheLayerMixin):
    """One layer: buffers [H, S, D]; live rows at [first, first + count); writes after them."""

    is_compileable = False
    is_sliding = False

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, first: int, count: int):
        super().__init__()
        self._key_buffer, self._value_buffer = keys, values
        self._first, self._count = first, count
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        return None  # the buffers exist already

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """key_states, value_states: [1, H, q, D] of the new tokens; returns [1, H, n + q, D]."""
        q = key_states.shape[-2]
        start = self._first + self._count
        self._key_buffer[:, start : start + q] = key_states[0]
        self._value_buffer[:, start : start + q] = value_states[0]
        self.keys = self._key_buffer[None, :, self._first : start + q]
        self.values = self._value_buffer[None, :, self._first : start + q]
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self._count + query_length, 0

    def get_seq_length(self) -> int:
        return self._count

    def get_max_length(self) -> int:
        return -1


class SlotCache(Cache):
    """A Cache over a replica's buffers for one forward pass."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, first: int, count: int):
        """keys, values: [L, H, S, D]; the live rows are slots [first, first + count), and the
        pass may write slots [first + count, S)."""
        layers = [SlotLayer(keys[i], values[i], first, count) for i in range(keys.shape[0])]
        super().__init__(layers=layers)  # type: ignore[arg-type]
