"""Shared test fixtures: the packaged demo model, and paths to ../shared (the Llama-2 tokenizer,
TinyStories text), skipped with a reason when absent."""

from __future__ import annotations

from pathlib import Path

import pytest

from positronic.models import demo_model_dir

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def shared_path(*parts: str) -> Path:
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is not present (models and data live in ../shared beside the repo)")
    return path


@pytest.fixture(scope="session")
def llama2_tokenizer_dir() -> Path:
    return shared_path("models", "llama2-tokenizer")


@pytest.fixture(scope="session")
def stories260k_dir() -> Path:
    """The demo model shipped inside the package (positronic/models/stories260K)."""
    return demo_model_dir()


@pytest.fixture(scope="session")
def tinystories_path() -> Path:
    return shared_path("data", "tinystories_dev.txt")
