"""Fixtures of the sampler tests: a weight store holding given rows, small structured weights."""

from __future__ import annotations

import numpy as np
import pytest

from hfs.bench.sampler import queries_near, structured_weights
from hfs.paramserver.store import InProcessStore


@pytest.fixture
def make_store():
    """The real in-process weight store holding ``weights`` as matrix ``name``."""
    stores = []

    def make(weights: np.ndarray, name: str = "fc") -> InProcessStore:
        store = InProcessStore()
        store.create(name, *weights.shape)
        store.set_rows(name, np.arange(len(weights)), np.ascontiguousarray(weights, dtype=np.float32))
        stores.append(store)
        return store

    yield make
    for store in stores:
        store.close()


@pytest.fixture(scope="session")
def small_world():
    """2000 classes in clusters of 20 (dim 32) and 64 queries near random classes."""
    weights = structured_weights(2000, 32, cluster_size=20, spread=1.0, seed=0)
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2000, 64).astype(np.int64)
    return weights, labels, queries_near(weights[labels], 0.7, rng)
