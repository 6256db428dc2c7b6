"""Brightness: the Halo Weave per-token salience, updated from each new token's attention.

The user's formula, a pure function: b' = clamp(b - decay + gain * attention, 0, max), with the
seed, decay, gain and max of `BrightnessParams` (defaults are the user's: 255, 2, 10, 255).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class BrightnessParams:
    seed: float = 255.0  # brightness of a newly appended token
    decay: float = 2.0  # subtracted from every row each tick
    gain: float = 10.0  # multiplies the new token's attention to the row
    max: float = 255.0  # upper clamp

    def __post_init__(self) -> None:
        if self.max <= 0 or not 0 <= self.seed <= self.max:
            raise ValueError("need 0 <= seed <= max and max > 0")
        if self.decay < 0 or self.gain < 0:
            raise ValueError("decay and gain must be non-negative")


USER_DEFAULTS = BrightnessParams()
# `halo-lm` (the default before the merging search), tuned on TinyStories with stories260K
# (docs/benchmarks.md): any attention gain made merging with the lm repairer worse there (that
# model's attention is diffuse and has no sinks), so the brightness of a row is its age and
# merges take the oldest pair after the protected sinks.
AGE_ONLY = BrightnessParams(gain=0.0)


def update_brightness(
    brightness: torch.Tensor, attention: torch.Tensor, params: BrightnessParams = USER_DEFAULTS
) -> torch.Tensor:
    """One tick of decay and attention gain.

    brightness: [S] current rows; attention: [S] the newest token's attention to those rows
    (mean over heads, already reduced over layers). Returns a new [S] tensor; inputs untouched.
    """
    if brightness.shape != attention.shape:
        raise ValueError(
            f"brightness {tuple(brightness.shape)} vs attention {tuple(attention.shape)}"
        )
    out = brightness.float() - params.decay + params.gain * attention.float()
    return out.clamp_(0.0, params.max)
