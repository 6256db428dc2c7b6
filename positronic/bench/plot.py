"""The quality plot: running NLL along the stream for every policy and the references."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from positronic.bench.stats import running_mean

SMOOTH_TOKENS = 100  # moving-average width of the lower panel


def _mean_over_streams(nll: Sequence[Sequence[float]]) -> np.ndarray:
    """Per-token mean over streams, truncated to the shortest stream: [T]."""
    n = min(len(x) for x in nll)
    return np.asarray([x[:n] for x in nll], dtype=np.float64).mean(axis=0)


def _moving_average(x: np.ndarray, width: int) -> np.ndarray:
    width = max(1, min(width, x.size))
    return np.convolve(x, np.ones(width) / width, mode="valid")


def plot_running_nll(
    path: str,
    curves: Mapping[str, Sequence[Sequence[float]]],
    reference: Sequence[Sequence[float]],
    full: Sequence[Sequence[float]] | None,
    title: str,
    full_label: str = "full cache",
) -> None:
    """Upper panel: cumulative mean NLL (mean over streams) against the token index. Lower
    panel: moving average of each policy's NLL minus the sliding-window reference's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 8), sharex=True)
    ref = _mean_over_streams(reference)
    x = np.arange(2, 2 + ref.size)  # scored tokens are token_ids[2:]
    top.plot(x, running_mean(ref), color="black", lw=2, label="sliding window (reference)")
    if full is not None:
        f = _mean_over_streams(full)
        top.plot(x[: f.size], running_mean(f), color="gray", ls="--", lw=2, label=full_label)
    for label, nll in curves.items():
        m = _mean_over_streams(nll)
        top.plot(x[: m.size], running_mean(m), lw=1.5, label=label)
        d = _moving_average(m - ref[: m.size], SMOOTH_TOKENS)
        bottom.plot(x[: d.size] + SMOOTH_TOKENS // 2, d, lw=1.2, label=label)
    bottom.axhline(0.0, color="black", lw=1)
    top.set_ylabel("running mean NLL (nats/token)")
    bottom.set_ylabel(f"NLL − reference ({SMOOTH_TOKENS}-token mean)")
    bottom.set_xlabel("token index in the stream")
    top.set_title(title)
    top.legend(fontsize=8)
    top.grid(alpha=0.3)
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
