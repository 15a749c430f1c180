"""Shared fixtures; CUDA tests skip without a GPU; ``kernel`` runs a test on each row kernel."""

from __future__ import annotations

import importlib.util

import pytest

HAS_NUMBA = importlib.util.find_spec("numba") is not None
#: the weight store's row kernels (paramserver.kernel): numba's runs only where numba is installed
ROW_KERNELS = ["numpy", pytest.param("numba", marks=pytest.mark.skipif(not HAS_NUMBA, reason="numba not installed"))]


@pytest.fixture(params=ROW_KERNELS)
def kernel(request) -> str:
    """``paramserver.kernel`` for a test that must hold on the compiled path and on the fallback."""
    return request.param


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:  # pragma: no cover
        has_cuda = False
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)
