"""How a synthetic data set's training labels stray from its identities: the regimes where mining hurts.

Real face data is not one clean label per person with plenty of images each. Uncleaned MS1M
holds the same person under two labels, a share of its samples carry the wrong label, and
most identities have a handful of images while a few have hundreds. A selection rule that
mines hard negatives meets all of these among its hardest candidates: a duplicate identity or
a mislabelled sample's true class is the nearest class there is. :class:`LabelPlan` lays out
such a data set over any generator of ``(identity, view)`` samples (rendered faces, latent
vectors), so the same regimes exist for ``hfs make-synthetic``, the ``synthetic`` and
``latent`` data sources and the benchmarks (:class:`Regime`):

- ``duplicates``: that share of the labels is a second label of another label's identity
  (with views of its own, disjoint from its twin's);
- ``label_noise``: that share of the training samples carries a label drawn uniformly from
  the other labels (held-out samples keep their true label);
- ``min_views``: a long tail: label ``c`` has ``counts[c]`` training views, log-uniform in
  ``[min_views, views]`` (0: every label has ``views``).

Everything is a pure function of ``(seed, settings)``: any process rebuilds the same plan.
A clean plan keeps no per-label table (10M labels cost nothing).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from hfs.utils.errors import HfsError
from hfs.utils.hashing import hashed_uniform, splitmix64

#: the largest share of duplicate labels: every twin needs a partner that is not a twin itself.
MAX_DUPLICATES = 0.5


@dataclass(frozen=True)
class Regime:
    """The ways the labels stray from the identities (see the module docstring); all off by default."""

    duplicates: float = 0.0
    label_noise: float = 0.0
    min_views: int = 0

    def check(self, views: int, name: Callable[[str], str] = str) -> None:
        """Raise HfsError naming the first setting out of range; ``name`` turns a field into what the user
        typed (a config key, a flag)."""
        if not 0.0 <= self.duplicates <= MAX_DUPLICATES:
            raise HfsError(f"{name('duplicates')} must be in [0, {MAX_DUPLICATES}], got {self.duplicates}")
        if not 0.0 <= self.label_noise < 1.0:
            raise HfsError(f"{name('label_noise')} must be in [0, 1), got {self.label_noise}")
        if not 0 <= self.min_views <= views:
            raise HfsError(f"{name('min_views')} must be in [0, {views}] (the views per class), got {self.min_views}")

    @property
    def clean(self) -> bool:
        return self.duplicates == 0.0 and self.label_noise == 0.0 and self.min_views == 0

    def key(self) -> str:
        """A short name of the settings for file names ('' when clean)."""
        if self.clean:
            return ""
        return f"_dup{self.duplicates:g}_noise{self.label_noise:g}_min{self.min_views}"


class LabelPlan:
    """Labels ``0..C-1`` over generator identities, with their training and held-out views.

    Label ``c``'s images are views ``view_offset[c] + j`` of generator identity
    ``identity[c]``: training views ``j < counts[c]``, held-out views ``views <= j < views +
    val_views`` (never a training view of any label, whatever its count). A twin label's
    offset is ``views + val_views``, so its images are other views of the same person.
    Generator identities stay in ``[0, C)``: identities from ``C`` on are unseen
    (verification pairs).
    """

    def __init__(self, num_classes: int, views: int, regime: Regime = Regime(), *, val_views: int = 1,
                 seed: int = 0) -> None:
        if num_classes <= 0 or views <= 0 or val_views < 0:
            raise HfsError(f"a label plan needs classes > 0, views > 0 and val_views >= 0, got "
                           f"{num_classes}, {views}, {val_views}")
        regime.check(views)
        self.num_classes, self.views, self.val_views = int(num_classes), int(views), int(val_views)
        self.regime, self.seed = regime, int(seed)
        rng = np.random.default_rng([self.seed, 0x1ABE1])
        self._identity = self._offset = self._first = None
        twins = int(round(regime.duplicates * self.num_classes))
        if twins:
            order = rng.permutation(self.num_classes)
            self._identity = np.arange(self.num_classes, dtype=np.int64)
            self._offset = np.zeros(self.num_classes, dtype=np.int64)
            self._identity[order[:twins]] = order[twins:2 * twins]
            self._offset[order[:twins]] = self.views + self.val_views
        if regime.min_views:
            lo, hi = math.log(regime.min_views), math.log(self.views + 1)
            counts = np.clip(np.floor(np.exp(rng.uniform(lo, hi, self.num_classes))), regime.min_views, self.views)
            self._first = np.concatenate([[0], np.cumsum(counts.astype(np.int64))])
        self._noise_key = np.uint64(int(rng.integers(0, 2**62)))

    @property
    def train_size(self) -> int:
        return int(self._first[-1]) if self._first is not None else self.num_classes * self.views

    @property
    def val_size(self) -> int:
        return self.num_classes * self.val_views

    def counts(self) -> np.ndarray:
        """Training views of every label."""
        if self._first is None:
            return np.full(self.num_classes, self.views, dtype=np.int64)
        return np.diff(self._first)

    def identity_of(self, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(generator identity, first view) of ``labels``."""
        labels = np.asarray(labels, dtype=np.int64)
        if self._identity is None:
            return labels, np.zeros_like(labels)
        return self._identity[labels], self._offset[labels]

    def train_items(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(generator identity, view, training label) of training samples ``indices`` (vectorised)."""
        indices = _checked(indices, self.train_size)
        if self._first is None:
            label, j = np.divmod(indices, self.views)
        else:
            label = np.searchsorted(self._first, indices, side="right") - 1
            j = indices - self._first[label]
        identity, offset = self.identity_of(label)
        return identity, offset + j, self.noisy(label, indices)

    def val_items(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(generator identity, view, true label) of held-out samples ``indices``."""
        indices = _checked(indices, self.val_size)
        label, j = np.divmod(indices, max(self.val_views, 1))
        identity, offset = self.identity_of(label)
        return identity, offset + self.views + j, label

    def train_labels(self) -> np.ndarray:
        """The training label of every training sample, in order (noise included)."""
        return self.train_items(np.arange(self.train_size))[2]

    # -- one split, as a dataset sees it --------------------------------------------------
    def size(self, split: str) -> int:
        return self.train_size if _split(split) == "train" else self.val_size

    def items(self, split: str, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(generator identity, view, label) of samples ``indices`` of ``split`` ('train' or 'val')."""
        return self.train_items(indices) if _split(split) == "train" else self.val_items(indices)

    def labels(self, split: str) -> np.ndarray:
        """The label of every sample of ``split``, in order."""
        if _split(split) == "train":
            return self.train_labels()
        return np.repeat(np.arange(self.num_classes, dtype=np.int64), self.val_views)

    def noisy(self, labels: np.ndarray, indices: np.ndarray) -> np.ndarray:
        """``labels`` with the ``label_noise`` share replaced by another label, a pure function of the sample index."""
        if self.regime.label_noise == 0.0 or self.num_classes < 2:
            return labels
        keys = np.asarray(indices, dtype=np.uint64) ^ self._noise_key
        flip = hashed_uniform(keys) < self.regime.label_noise
        other = (splitmix64(splitmix64(keys)) % np.uint64(self.num_classes - 1)).astype(np.int64)
        other += other >= labels  # any label but the true one
        return np.where(flip, other, labels)


def _split(split: str) -> str:
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    return split


def _checked(indices: np.ndarray, size: int) -> np.ndarray:
    indices = np.asarray(indices, dtype=np.int64)
    if indices.size and (indices.min() < 0 or indices.max() >= size):
        raise IndexError(f"sample index out of range [0, {size})")
    return indices
