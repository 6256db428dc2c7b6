"""Models shipped inside the package: stories260K, the default demo model (MIT; see its README).

Only this 1.1 MB model ships; bigger models are named by hub id or directory."""

from __future__ import annotations

from pathlib import Path

DEMO_MODEL = "stories260K"


def demo_model_dir() -> Path:
    """The packaged demo model's folder (a plain directory: the package installs unzipped)."""
    return Path(__file__).resolve().parent / DEMO_MODEL
