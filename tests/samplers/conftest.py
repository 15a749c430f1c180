"""Test doubles for the sampler tests: a WeightStore over one numpy array, small structured weights."""

from __future__ import annotations

from typing import Iterator

import numpy as np
import pytest

from hfs.bench.sampler import queries_near, structured_weights
from hfs.paramserver.base import HParams, WeightStore


class ArrayStore(WeightStore):
    """Just enough of a WeightStore for the selector: named numpy matrices, plain SGD on push."""

    def __init__(self) -> None:
        self.mats: dict[str, np.ndarray] = {}
        self.lr = 0.1

    def create(self, name, num_rows, dim, *, init="gaussian", std=0.01, seed=0, exist_ok=False):
        self.mats[name] = np.random.default_rng(seed).normal(0, std, (num_rows, dim)).astype(np.float32)

    def shape(self, name):
        return self.mats[name].shape

    def get_rows(self, name, rows, step=None):
        return self.mats[name][rows].copy()

    def set_rows(self, name, rows, values):
        self.mats[name][rows] = values

    def push_grads(self, name, rows, grads, step):
        np.subtract.at(self.mats[name], rows, self.lr * grads)

    def set_hparams(self, name, hparams: HParams):
        self.lr = hparams.lr

    def iter_chunks(self, name, chunk_rows=65536) -> Iterator[tuple[int, np.ndarray]]:
        mat = self.mats[name]
        for start in range(0, len(mat), chunk_rows):
            yield start, mat[start:start + chunk_rows].copy()

    def snapshot(self, tag=None):
        raise NotImplementedError("not needed by the sampler tests")

    def restore(self, tag="latest"):
        raise NotImplementedError("not needed by the sampler tests")

    def stats(self):
        return {}


@pytest.fixture
def make_store():
    def make(weights: np.ndarray, name: str = "fc") -> ArrayStore:
        store = ArrayStore()
        store.mats[name] = np.array(weights, dtype=np.float32)
        return store
    return make


@pytest.fixture(scope="session")
def small_world():
    """2000 classes in clusters of 20 (dim 32) and 64 queries near random classes."""
    weights = structured_weights(2000, 32, cluster_size=20, spread=1.0, seed=0)
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2000, 64).astype(np.int64)
    return weights, labels, queries_near(weights[labels], 0.7, rng)
