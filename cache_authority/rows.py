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
        if not (math.isfinite(self.rope_theta) and self.rope_theta >= 0):
            raise ValueError(f"rope_theta {self.rope_theta} must be finite and not negative")
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

    def session_bytes(self, hard_max_rows: int) -> int:
        """Bytes the authority preallocates for a session of `hard_max_rows`: canonical keys
        and values (K/V of one row) plus token id, origin and brightness, in each of its
        2 * hard_max_rows slots (rows.slot_capacity)."""
        return 2 * hard_max_rows * (self.row_bytes + 8 + 8 + 4)


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
    replaced_text: str = ""  # a merged row: ReplacePairOp.replaced_text, as the patch gave it


def slot_capacity(budget: Budget) -> int:
    """C, the slots a session's row buffers hold: twice the hard maximum, a fixed function of the
    budget so that the authority and every replica agree. With C = 2 * hard_max, the rows moved
    by a rebase (from [base, base + n) to [0, n), needed only when base + n + appended > C) never
    overlap their destination: base > C - hard_max >= n."""
    return 2 * budget.hard_max_rows


@dataclass
class SessionState:
    """Preallocated slots plus the mirror.

    The live rows occupy slots [position_offset, position_offset + row_count): row i sits in slot
    position_offset + i, and its rotary position is that same number (positions only matter
    through differences, which always equal index differences; DESIGN.md invariant 5).
    Edits move the shorter side of the rows (stage.py), so the offset moves too.

    The authority keeps canonical keys (exactly as computed, at each row's origin position),
    values, and per-slot token ids, origin positions and brightness; it never rotates anything.
    Replica mode (`rotated=True`, what model workers hold) also keeps `rotated_keys`: each row's
    key rotated to its current position, re-derived in one step from its canonical key whenever
    the row is written or moves. K/V buffers live on `device`; the per-slot scalars stay on the
    CPU, where validation reads them. `scratch_slots` adds K/V slots past C that no op touches
    (room for a worker's in-place forward writes).
    """

    session_id: str
    geometry: Geometry
    budget: Budget
    seed_brightness: float = 255.0
    version: int = 0
    digest: bytes = b""
    next_ledger_id: int = 0
    row_count: int = 0
    created_unix_ns: int = 0
    position_offset: int = 0
    rotated: bool = False
    device: torch.device | str = "cpu"
    scratch_slots: int = 0
    # K/V buffers [L, H, C + scratch_slots, D]; only slots [base, base + row_count) are live.
    canonical_keys: torch.Tensor = field(init=False)  # as computed at each row's origin
    values: torch.Tensor = field(init=False)
    rotated_keys: torch.Tensor | None = field(init=False)  # replica mode: at slot positions
    # Per-slot scalars [C], on the CPU.
    token_ids: torch.Tensor = field(init=False)  # int64
    origin_positions: torch.Tensor = field(init=False)  # int64, rotary position of the K/V
    brightness: torch.Tensor = field(init=False)  # float32
    meta: list[RowMeta] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.scratch_slots < 0:
            raise ValueError("scratch_slots must not be negative")
        self.device = torch.device(self.device)
        c = slot_capacity(self.budget)
        shape = self.geometry.kv_shape(c + self.scratch_slots)
        dt, dev = self.geometry.dtype, self.device
        self.canonical_keys = torch.zeros(shape, dtype=dt, device=dev)
        self.values = torch.zeros(shape, dtype=dt, device=dev)
        self.rotated_keys = torch.zeros(shape, dtype=dt, device=dev) if self.rotated else None
        self.token_ids = torch.zeros(c, dtype=torch.int64)
        self.origin_positions = torch.zeros(c, dtype=torch.int64)
        self.brightness = torch.zeros(c, dtype=torch.float32)

    @property
    def capacity(self) -> int:
        """C: slots available to rows (scratch slots excluded)."""
        return self.token_ids.numel()

    def slot_range(self) -> tuple[int, int]:
        """[first, end) slots of the live rows; also their rotary positions."""
        return self.position_offset, self.position_offset + self.row_count

    def _live(self) -> slice:
        return slice(self.position_offset, self.position_offset + self.row_count)

    # Read-only views over the live rows.
    def live_keys(self) -> torch.Tensor:
        """Keys rotated to the rows' current positions [L, H, N, D] (replica mode only)."""
        if self.rotated_keys is None:
            raise RuntimeError(f"session {self.session_id}: not a replica, keys are canonical")
        return self.rotated_keys[:, :, self._live()]

    def live_canonical_keys(self) -> torch.Tensor:
        return self.canonical_keys[:, :, self._live()]

    def live_values(self) -> torch.Tensor:
        return self.values[:, :, self._live()]

    def live_origin_positions(self) -> torch.Tensor:
        return self.origin_positions[self._live()]

    def live_token_ids(self) -> list[int]:
        return self.token_ids[self._live()].tolist()

    def row_token_ids(self, start: int, stop: int) -> list[int]:
        """Token ids of rows [start, stop) (row indices, not slots)."""
        base = self.position_offset
        return self.token_ids[base + start : base + stop].tolist()

    def live_brightness(self) -> list[float]:
        return self.brightness[self._live()].tolist()
