"""RoPE re-rotation of stored keys for Hugging Face Llama (the rotate_half convention).

HF stores keys after RoPE: k_p = s * R(p) k, with s = attention_scaling folded into cos/sin.
Rotations compose, R(a) R(b) = R(a + b), so moving a stored key from position p0 to p is
R(p - p0) applied to it, *without* s (it is already in the key). Invariant 5 of DESIGN.md: the
rotation is always derived once from the canonical key (as computed at its origin position) and
the total offset, never accumulated tick after tick — repeated bf16 rotations destroy keys.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# RoPE types (Hugging Face's names) whose frequencies depend on the sequence length.
LENGTH_DEPENDENT = frozenset({"dynamic", "longrope"})


@dataclass(frozen=True)
class Rope:
    """The rotation a model applies: one inverse frequency per dimension pair."""

    inv_freq: torch.Tensor  # [D/2], float32
    attention_scaling: float = 1.0  # informational: re-rotation never applies it

    def __post_init__(self) -> None:
        if self.inv_freq.dim() != 1:
            raise ValueError("inv_freq must be one-dimensional [D/2]")

    @property
    def head_dim(self) -> int:
        return 2 * self.inv_freq.numel()

    @classmethod
    def from_theta(cls, head_dim: int, theta: float = 10000.0) -> Rope:
        """The default RoPE frequencies, computed exactly as HF's Llama does (a float32 arange,
        theta ** in float32): bit for bit the model's own `rotary_emb.inv_freq`."""
        inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
        return cls(inv_freq=inv)

    @classmethod
    def from_config(cls, config) -> Rope:
        """Frequencies exactly as the HF model computes them (default, linear, llama3, yarn...).

        RoPE types whose frequencies change with the sequence length (dynamic NTK; longrope,
        which switches to its long factors past the original context) are refused: one fixed
        inv_freq cannot re-rotate their keys (longrope measured 2.6 off at a 2,000 shift)."""
        params = dict(getattr(config, "rope_parameters", None) or {})
        rope_type = params.get("rope_type", "default")
        if rope_type in LENGTH_DEPENDENT:
            raise ValueError(
                f"RoPE type {rope_type!r} changes its frequencies with the sequence length: "
                "stored keys cannot be re-rotated with one fixed inv_freq, so models using it "
                "are not supported"
            )
        if rope_type == "default":
            head_dim = getattr(config, "head_dim", None) or (
                config.hidden_size // config.num_attention_heads
            )
            return cls.from_theta(head_dim, float(params.get("rope_theta", 10000.0)))
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        if rope_type not in ROPE_INIT_FUNCTIONS:
            raise ValueError(f"unknown RoPE type {str(rope_type)[:32]!r}")
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, None)
        return cls(inv_freq=inv_freq.float().cpu(), attention_scaling=float(scaling))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotate_keys(keys: torch.Tensor, offsets: torch.Tensor, rope: Rope) -> torch.Tensor:
    """Rotate keys by per-row position offsets, computed in float32, returned in keys' dtype.

    keys: [..., S, D] (e.g. [L, H, S, D]); offsets: [S] integer (new position - origin position).
    """
    if keys.shape[-1] != rope.head_dim:
        raise ValueError(f"keys have head dim {keys.shape[-1]}, rope expects {rope.head_dim}")
    # float64 angles: offsets reach 10^4..10^6 and float32 angle products lose digits there.
    angles = offsets.to(torch.float64)[:, None] * rope.inv_freq.to(torch.float64)[None, :]
    cos = angles.cos().to(torch.float32).to(keys.device)  # [S, D/2]
    sin = angles.sin().to(torch.float32).to(keys.device)
    k = keys.to(torch.float32)
    half = k.shape[-1] // 2
    k1, k2 = k[..., :half], k[..., half:]
    # rotate_half convention: (k1, k2) -> (k1 cos - k2 sin, k2 cos + k1 sin)
    return torch.cat((k1 * cos - k2 * sin, k2 * cos + k1 * sin), dim=-1).to(keys.dtype)


def rerotate_from_canonical(
    canonical_keys: torch.Tensor,
    origin_positions: torch.Tensor,
    positions: torch.Tensor,
    rope: Rope,
) -> torch.Tensor:
    """Keys of rows now at `positions`, from their canonical keys computed at `origin_positions`.

    canonical_keys: [L, H, S, D]; origin_positions, positions: [S].
    """
    return rotate_keys(canonical_keys, positions - origin_positions, rope)
