"""Shared fixtures: determinism and the read-only data folder."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DATA_ROOT = Path(os.environ.get("CNN_INTERNALS_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def data_root() -> Path:
    """../shared/data: the tests need it and fail loudly (never skip) when absent."""
    if not DATA_ROOT.is_dir():
        pytest.fail(
            f"data folder {DATA_ROOT} not found: the tests read MNIST and Imagenette from ../shared/data "
            "(or set CNN_INTERNALS_DATA)",
            pytrace=False,
        )
    return DATA_ROOT
