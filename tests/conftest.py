"""Shared fixtures: a small synthetic dataset on disk, single-threaded torch, the repo root."""

from __future__ import annotations

from pathlib import Path

import pytest

from tasks.synthetic import ensure_dataset

REPO = Path(__file__).resolve().parent.parent



@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """8 train and 6 val scenes in all three formats (COCO json, DOTA txt, label maps)."""
    return ensure_dataset(tmp_path_factory.mktemp("synthetic"), n_train=8, n_val=6, seed=0, progress=False)
