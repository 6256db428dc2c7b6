"""An attention function that runs sdpa and also returns the newest query's softmax row.

sdpa returns no attention weights and eager materialises every [q, kv] score; Halo Weave needs
only the newest token's row. So the model runs with this registered function: the output is
sdpa's, and it computes softmax(q_last · Kᵀ · scaling) over every key, shape [B, n_heads, 1, kv] —
what eager would return for that query (checked against eager in the tests) — in the layers a
`RowRecorder` passed as the forward's `row_recorder` keyword asks for (the worker's forwards: only
the layers the requested reduction reads, e.g. the last one), or in every layer when the caller
asks for attentions (`output_attentions=True`, Hugging Face's way). It is registered in both
AttentionInterface and AttentionMaskInterface: without the mask entry the mask is None and
multi-token forwards over a cache are silently wrong (NOTES-transformers5.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

NAME = "positronic_sdpa_row"

LAST_LAYER, MEAN_LAYERS, MAX_LAYERS = "last", "mean", "max"
REDUCTIONS = (LAST_LAYER, MEAN_LAYERS, MAX_LAYERS)


def newest_query_row(
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None,
) -> torch.Tensor:
    """Softmax row of the last query over every key, in float32.

    query: [B, nH, q, D]; key: [B, H, kv, D] (H divides nH); mask: bool (True attends) or
    additive, broadcastable to [B, nH, q, kv]. Returns [B, nH, 1, kv].
    """
    b, n_heads, _, d = query.shape
    h, kv = key.shape[1], key.shape[2]
    groups = n_heads // h
    scale = scaling if scaling is not None else d**-0.5
    q = query[:, :, -1, :].float().reshape(b, h, groups, d)  # query head i uses kv head i // g
    scores = q @ key.float().transpose(-1, -2) * scale  # [B, H, g, kv]
    scores = scores.reshape(b, n_heads, 1, kv)
    if attention_mask is not None:
        last = attention_mask[..., -1:, :]
        if last.dtype == torch.bool:
            scores = scores.masked_fill(~last, float("-inf"))
        else:
            scores = scores + last.float()
    return scores.softmax(dim=-1)


@dataclass
class RowRecorder:
    """Collects the newest query's attention row of the layers in `layers` during one forward."""

    layers: frozenset[int]
    rows: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [nH, kv] float32

    @classmethod
    def for_reduction(cls, how: str, num_layers: int) -> RowRecorder:
        """The layers a reduction reads: the last one, or all of them."""
        if how not in REDUCTIONS:
            raise ValueError(f"unknown layer reduction {how!r}")
        wanted = {num_layers - 1} if how == LAST_LAYER else set(range(num_layers))
        return cls(frozenset(wanted))

    def reduced(self, how: str) -> torch.Tensor:
        """One row [kv]: mean over query heads, then over layers as `how` says."""
        return reduce_rows([self.rows[i][None, :, None, :] for i in sorted(self.rows)], how)


def sdpa_with_row(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """AttentionInterface signature: returns (sdpa output, newest-query row or None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    want_row = bool(kwargs.pop("output_attentions", False))
    recorder: RowRecorder | None = kwargs.pop("row_recorder", None)
    out, _ = sdpa_attention_forward(
        module, query, key, value, attention_mask, scaling=scaling, **kwargs
    )
    row = None
    layer = getattr(module, "layer_idx", -1)
    if want_row or (recorder is not None and layer in recorder.layers):
        row = newest_query_row(query, key, attention_mask, scaling)
        if recorder is not None:
            recorder.rows[layer] = row[0, :, 0]
    return out, row if want_row else None


def register() -> None:
    """Idempotent: make NAME a valid attn_implementation."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, sdpa_with_row)
    AttentionMaskInterface.register(NAME, sdpa_mask)


def install(model: torch.nn.Module) -> None:
    register()
    model.set_attn_implementation(NAME)  # type: ignore[operator]


def reduce_rows(rows: tuple[torch.Tensor, ...] | list[torch.Tensor], how: str) -> torch.Tensor:
    """Per-layer rows [B, nH, 1, kv] -> one row [kv]: mean over query heads (batch 0), then the
    last layer, the mean over layers, or the max over layers."""
    if how not in REDUCTIONS:
        raise ValueError(f"unknown layer reduction {how!r}")
    per_layer = torch.stack([r[0, :, -1, :].float().mean(dim=0) for r in rows])  # [L, kv]
    if how == LAST_LAYER:
        return per_layer[-1]
    if how == MEAN_LAYERS:
        return per_layer.mean(dim=0)
    return per_layer.max(dim=0).values
