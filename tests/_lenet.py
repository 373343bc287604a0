"""Shared by the LeNet-5 model and training tests: one torch thread, and the MNIST test set read once."""
from __future__ import annotations

import functools

import pytest
import torch

from adapters.datasets import mnist
from conftest import DATA_ROOT


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Run the importing module on one torch thread.

    The models are tiny, and on a small shared CPU several OpenMP threads per
    process stall each other (a 3x slowdown measured here); results do not
    depend on it.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@functools.lru_cache(maxsize=1)
def _load_mnist_test():
    return mnist(DATA_ROOT, train=False)


def mnist_test():
    """The full MNIST test set (read once); fails (never skips) when the data folder is missing."""
    try:
        return _load_mnist_test()
    except FileNotFoundError as exc:
        pytest.fail(f"MNIST test files are needed for this test: {exc}")
