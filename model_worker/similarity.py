"""How alike adjacent rows are, for a policy that merges the most redundant pair (halo-redundant).

Computed by the Tick only when asked (TickRequest.adjacent_similarity): the driver holds no K/V,
and the worker's replica has every row's key rotated to its index, so the similarity of all
S + 1 rows (the input token last) is one elementwise pass — O(L·H·S·D), far below the forward's
cost, and nothing at all for a policy that does not ask.
"""

from __future__ import annotations

import torch

from model_worker.forward import KV, Rows
from positronic.rope import Rope
from positronic.selection import adjacent_similarity


def tick_similarity(rows: Rows, input_kv: KV, rope: Rope) -> torch.Tensor:
    """[S]: value i the similarity of row i to row i + 1, row S being the Tick's input token
    (its K/V at the row count's position). rows: the replica's rows the Tick read."""
    keys = torch.cat([rows.keys, input_kv.keys.to(rows.keys.device)], dim=2)  # [L, H, S + 1, D]
    values = torch.cat([rows.values, input_kv.values.to(rows.values.device)], dim=2)
    return adjacent_similarity(keys, values, rope).cpu()
