"""A session's rows: geometry, budget, the preallocated KV buffers and the mirror beside them.

Only the types live here; `cache_authority.state` holds the functions that change them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from positronic.rope import Rope

KV_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Geometry:
    """Shape and identity of a session's rows."""

    num_layers: int  # L
    num_kv_heads: int  # H
    head_dim: int  # D
    dtype: torch.dtype
    rope: Rope
    vocab_size: int
    model_fingerprint: str = ""
    max_position_embeddings: int = 0
    # Carried for display and fingerprinting only; re-rotation uses rope.inv_freq.
    rope_type: str = ""
    rope_theta: float = 0.0
    rope_scaling: tuple[tuple[str, float], ...] = ()

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_dim", "vocab_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"geometry {name} must be positive")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for RoPE")
        if self.rope.head_dim != self.head_dim:
            raise ValueError(
                f"rope has {self.rope.inv_freq.numel()} frequencies; head_dim {self.head_dim} "
                f"needs {self.head_dim // 2}"
            )
        if not bool(torch.isfinite(self.rope.inv_freq).all()):
            raise ValueError("rope inv_freq contains NaN or inf")
        if not math.isfinite(self.rope.attention_scaling):
            raise ValueError("rope attention_scaling must be finite")
        if self.dtype not in KV_DTYPES:
            raise ValueError(f"KV dtype must be float32, float16 or bfloat16, not {self.dtype}")
        if self.max_position_embeddings < 0:
            raise ValueError("max_position_embeddings must not be negative")

    def kv_shape(self, n: int) -> tuple[int, int, int, int]:
        return (self.num_layers, self.num_kv_heads, n, self.head_dim)

    @property
    def row_bytes(self) -> int:
        """Bytes of one token's K and V across all layers."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype.itemsize

    def session_bytes(self, rows: int) -> int:
        """Bytes a session preallocates for `rows` rows: rotated keys, canonical keys, values."""
        return rows * (self.row_bytes * 3 // 2 + 8 + 8 + 4)


@dataclass(frozen=True)
class Budget:
    target_rows: int
    hard_max_rows: int

    def __post_init__(self) -> None:
        if self.hard_max_rows <= 0:
            raise ValueError("hard_max_rows must be positive")
        if not 0 < self.target_rows <= self.hard_max_rows:
            raise ValueError("target_rows must be in [1, hard_max_rows]")


@dataclass
class RowMeta:
    """The mirror's per-row metadata that is not a tensor."""

    ledger_id: int
    piece: str
    source: int  # session_pb2.TokenSource
    origin_position: int
    created_version: int
    replaced_ledger_ids: tuple[int, ...] = ()
    replaced_token_ids: tuple[int, ...] = ()


@dataclass
class SessionState:
    """Preallocated rows plus the mirror. Row i holds the K/V of token_ids[i] at position i."""

    session_id: str
    geometry: Geometry
    budget: Budget
    seed_brightness: float = 255.0
    version: int = 0
    digest: bytes = b""
    next_ledger_id: int = 0
    row_count: int = 0
    created_unix_ns: int = 0
    # Tensors, preallocated to hard_max_rows (S); only [:row_count] is meaningful.
    keys: torch.Tensor = field(init=False)  # [L, H, S, D], rotated to the row's index
    canonical_keys: torch.Tensor = field(init=False)  # [L, H, S, D], as computed at origin
    values: torch.Tensor = field(init=False)  # [L, H, S, D]
    token_ids: torch.Tensor = field(init=False)  # [S] int64
    origin_positions: torch.Tensor = field(init=False)  # [S] int64
    brightness: torch.Tensor = field(init=False)  # [S] float32
    meta: list[RowMeta] = field(default_factory=list)

    def __post_init__(self) -> None:
        shape = self.geometry.kv_shape(self.budget.hard_max_rows)
        dt = self.geometry.dtype
        self.keys = torch.zeros(shape, dtype=dt)
        self.canonical_keys = torch.zeros(shape, dtype=dt)
        self.values = torch.zeros(shape, dtype=dt)
        s = self.budget.hard_max_rows
        self.token_ids = torch.zeros(s, dtype=torch.int64)
        self.origin_positions = torch.zeros(s, dtype=torch.int64)
        self.brightness = torch.zeros(s, dtype=torch.float32)

    # Read-only views over the live rows.
    def live_keys(self) -> torch.Tensor:
        return self.keys[:, :, : self.row_count]

    def live_canonical_keys(self) -> torch.Tensor:
        return self.canonical_keys[:, :, : self.row_count]

    def live_values(self) -> torch.Tensor:
        return self.values[:, :, : self.row_count]

    def live_token_ids(self) -> list[int]:
        return self.token_ids[: self.row_count].tolist()

    def live_brightness(self) -> list[float]:
        return self.brightness[: self.row_count].tolist()
