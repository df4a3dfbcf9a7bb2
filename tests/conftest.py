"""Shared test fixtures: locations of ../shared data beside the repository."""
from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def _need(p: Path) -> Path:
    if not p.exists():
        pytest.skip(f"shared data missing: {p} (clone the repo with ../shared beside it)")
    return p


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    return _need(SHARED)


@pytest.fixture(scope="session")
def stories_model_path() -> Path:
    return _need(SHARED / "models" / "stories260K" / "stories260K.bin")


@pytest.fixture(scope="session")
def stories_tokenizer_path() -> Path:
    return _need(SHARED / "models" / "stories260K" / "tok512.bin")


@pytest.fixture(scope="session")
def tinystories_train() -> Path:
    return _need(SHARED / "data" / "tinystories" / "train.txt")


@pytest.fixture(scope="session")
def tinystories_valid() -> Path:
    return _need(SHARED / "data" / "tinystories" / "valid.txt")


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return _need(SHARED / "fixtures")
