"""Synthetic identities at the embedding level: the regime where the classifier is the cost.

At millions of identities the softmax layer, not the backbone, dominates a step. To measure
samplers where that holds on a 2-core CPU, and to train to convergence, identities are
generated as vectors instead of images:

- each identity has a latent ``z`` (``latent_dim``) drawn around its cluster's centre:
  ``cluster_size`` consecutive identities share a centre and differ by
  ``within_cluster`` (look-alikes, the hard negatives);
- each sample adds identity noise (``identity_noise`` on ``z``) and an independent nuisance
  vector (``nuisance_dim``, pose/light-like factors that carry no identity);
- a fixed random non-linear generator (two random layers with ``tanh``, seeded) maps
  ``[z + noise, nuisance]`` to the ``input_dim`` input vector a backbone sees.

Everything is a deterministic function of ``(seed, class, view)`` through a counter-based
hash, so any item can be made on the fly, in any order, by any worker, with no C-sized
table; ``__getitems__`` makes a whole batch with a few matrix products.
"""

from __future__ import annotations

import numpy as np
import torch

from hfs.data.plan import LabelPlan, Regime
from hfs.utils.hashing import splitmix64


def hashed_normals(seed: int, stream: int, keys: np.ndarray, dim: int) -> np.ndarray:
    """Standard normals of shape (len(keys), dim), a pure function of (seed, stream, key, column)."""
    keys = np.asarray(keys, dtype=np.uint64)
    base = splitmix64(splitmix64(np.uint64(seed)) ^ np.uint64(stream * 0x632BE59BD9B4E019 & 0xFFFFFFFFFFFFFFFF))
    with np.errstate(over="ignore"):
        counters = (keys[:, None] * np.uint64(2 * dim) + np.arange(2 * dim, dtype=np.uint64)[None, :]) ^ base
    bits = splitmix64(counters)
    uniform = ((bits >> np.uint64(11)).astype(np.float64) + 0.5) / float(1 << 53)  # in (0, 1)
    u1, u2 = uniform[:, :dim], uniform[:, dim:]
    return (np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)).astype(np.float32)


class LatentGenerator:
    """The fixed identity -> vector map; see the module docstring."""

    def __init__(self, seed: int = 0, *, input_dim: int = 64, latent_dim: int = 32, nuisance_dim: int = 8,
                 hidden_dim: int = 128, cluster_size: int = 8, within_cluster: float = 0.5,
                 identity_noise: float = 0.5) -> None:
        self.seed, self.input_dim, self.latent_dim, self.nuisance_dim = int(seed), input_dim, latent_dim, nuisance_dim
        self.cluster_size, self.within, self.noise = int(cluster_size), float(within_cluster), float(identity_noise)
        rng = np.random.default_rng([self.seed, 7])
        width = latent_dim + nuisance_dim
        self.w1 = (rng.standard_normal((width, hidden_dim)) / np.sqrt(width)).astype(np.float32)
        self.b1 = (0.3 * rng.standard_normal(hidden_dim)).astype(np.float32)
        self.w2 = (rng.standard_normal((hidden_dim, input_dim)) / np.sqrt(hidden_dim)).astype(np.float32)

    def identity(self, classes: np.ndarray) -> np.ndarray:
        """Unit-norm identity latents of ``classes``: cluster centre + a look-alike offset."""
        classes = np.asarray(classes, dtype=np.int64)
        centre = hashed_normals(self.seed, 1, classes // self.cluster_size, self.latent_dim)
        own = hashed_normals(self.seed, 2, classes, self.latent_dim)
        z = centre + self.within * own
        return z / np.linalg.norm(z, axis=1, keepdims=True)

    def samples(self, classes: np.ndarray, views: np.ndarray) -> np.ndarray:
        """Input vectors (len, input_dim) of view ``views[i]`` of identity ``classes[i]``."""
        classes = np.asarray(classes, dtype=np.int64)
        key = classes.astype(np.uint64) * np.uint64(1 << 20) + np.asarray(views, dtype=np.uint64)
        z = self.identity(classes) + (self.noise / np.sqrt(self.latent_dim)) * hashed_normals(
            self.seed, 3, key, self.latent_dim)
        nuisance = hashed_normals(self.seed, 4, key, self.nuisance_dim)
        hidden = np.tanh(np.concatenate([z * np.sqrt(self.latent_dim), nuisance], axis=1) @ self.w1 + self.b1)
        return (hidden @ self.w2).astype(np.float32)


class LatentIdentities:
    """A torch-style Dataset over :class:`LatentGenerator` (items: float32 vector, int label).

    ``split="train"`` holds views ``0..views_per_class-1`` of classes ``first_class..``,
    ``split="val"`` the next ``val_per_class`` views of the same identities. ``regime``
    (:class:`~hfs.data.plan.Regime`): duplicate labels, label noise, a long tail of views per
    class, laid out by a :class:`~hfs.data.plan.LabelPlan` seeded by the generator's seed.
    """

    def __init__(self, generator: LatentGenerator, num_classes: int, views_per_class: int, *,
                 split: str = "train", val_per_class: int = 1, first_class: int = 0,
                 regime: Regime = Regime()) -> None:
        self.gen, self.num_classes, self.first_class = generator, int(num_classes), int(first_class)
        self.plan = LabelPlan(num_classes, views_per_class, regime, val_views=val_per_class, seed=generator.seed)
        self.split, self.epoch = split, 0
        self._size = self.plan.size(split)

    def __len__(self) -> int:
        return self._size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)  # the samples are fixed, as images are

    def labels(self) -> np.ndarray:
        return self.plan.labels(self.split)

    def _vectors(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        identity, view, label = self.plan.items(self.split, indices)
        return self.gen.samples(identity + self.first_class, view), label

    def __getitem__(self, index: int):
        x, cls = self._vectors(np.array([index]))
        return torch.from_numpy(x[0]), int(cls[0])

    def __getitems__(self, indices: list[int]) -> list:
        """A whole batch at once (torch's DataLoader calls this when it exists)."""
        x, cls = self._vectors(np.asarray(indices))
        rows = torch.from_numpy(x)
        return [(rows[i], int(c)) for i, c in enumerate(cls)]
