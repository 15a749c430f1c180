"""The one rule that turns a batch's labels + index candidates into its active classes.

Every sampler (annoy, hnsw, exact, random) feeds this same function, so they differ only
in the candidates they find. The active set is laid out as::

    [ positives (sorted unique labels) | nearest negatives (rank order) | uniform fill ]

and always has exactly ``sample_num`` entries, except when the batch alone has more
distinct labels than that (then every positive is kept and nothing else is added).
Negatives are taken round-robin over the batch by rank: first every query's best
candidate, then every query's second best, ... so each query contributes its hardest
negatives before any query contributes its easier ones. Everything is vectorised numpy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def auto_neighbours(sample_num: int, batch_size: int, num_classes: int) -> int:
    """Candidates per query when ``sampler.k`` is 0: enough for the round-robin to fill up.

    A batch of B queries needs about (S - B) negatives, i.e. ceil(S / B) per query; twice
    that absorbs duplicates between queries of one cluster, and +1 absorbs each query's
    own class (usually its best match, but already a positive).
    """
    per_query = 2 * math.ceil(sample_num / max(batch_size, 1)) + 1
    return int(max(1, min(per_query, num_classes)))


def _first_occurrence_unique(ids: np.ndarray) -> np.ndarray:
    """Unique values of ``ids`` in the order they first appear (np.unique sorts)."""
    if ids.size == 0:
        return ids
    _, first = np.unique(ids, return_index=True)
    return ids[np.sort(first)]


def _uniform_fill(taken: np.ndarray, count: int, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` distinct class ids drawn uniformly from those not in ``taken``.

    With few classes taken (the usual case: 1000 of 1M) rejection sampling touches only
    O(count) memory; when most classes are taken, drawing from the explicit complement is
    cheaper and cannot loop.
    """
    if count <= 0:
        return np.empty(0, dtype=np.int64)
    free = num_classes - taken.size
    if count > free:
        raise ValueError(f"cannot draw {count} classes from the {free} not yet active")
    if free <= 4 * count or num_classes <= 65536:
        complement = np.setdiff1d(np.arange(num_classes, dtype=np.int64), taken, assume_unique=True)
        return rng.choice(complement, size=count, replace=False).astype(np.int64)
    picked = np.empty(0, dtype=np.int64)
    while picked.size < count:
        draw = rng.integers(0, num_classes, size=2 * (count - picked.size) + 16, dtype=np.int64)
        draw = _first_occurrence_unique(np.concatenate([picked, draw]))
        picked = draw[~np.isin(draw, taken)]
    return picked[:count]


def select_active_classes(labels: np.ndarray, candidates: np.ndarray | None, sample_num: int,
                          num_classes: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Active class ids (S,) int64 and the batch's labels remapped into them (B,) int64.

    ``candidates`` is (B, k) int64, best first, -1 for "none found" (or None / k = 0: no
    index). Positives come first in sorted order, so ``active[local_labels] == labels``.
    A label of -1 marks a query whose positive is not among these classes (the sharded
    classifier indexes one shard, and a sample's class may live on another rank): it adds
    no positive, its candidates still count, and its local label stays -1.
    When ``sample_num >= num_classes`` the active set is every class in order (the
    candidates are ignored) and the labels are returned as they are. When the batch has
    more distinct labels than ``sample_num``, all of them are returned (more than
    ``sample_num``); the caller decides how loudly to say so.
    """
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    if labels.size and (labels.min() < -1 or labels.max() >= num_classes):
        bad = labels[(labels < -1) | (labels >= num_classes)][0]
        raise ValueError(f"label {bad} is outside [0, {num_classes}) (or -1: no positive here)")
    if sample_num >= num_classes:
        return np.arange(num_classes, dtype=np.int64), labels.copy()

    known = labels >= 0
    positives = np.unique(labels[known])
    local_labels = np.where(known, np.searchsorted(positives, labels), -1).astype(np.int64)
    need = sample_num - positives.size
    if need <= 0:
        return positives, local_labels

    negatives = np.empty(0, dtype=np.int64)
    if candidates is not None and np.size(candidates):
        ranked = np.asarray(candidates, dtype=np.int64).reshape(labels.size, -1).T.ravel()
        ranked = ranked[(ranked >= 0) & (ranked < num_classes)]
        ranked = ranked[~np.isin(ranked, positives)]
        negatives = _first_occurrence_unique(ranked)[:need]

    taken = np.concatenate([positives, negatives])
    fill = _uniform_fill(np.sort(taken), need - negatives.size, num_classes, rng)
    return np.concatenate([taken, fill]), local_labels


@dataclass(frozen=True)
class Selection:
    """What a selection rule answers for one batch.

    ``active`` (S,) int64 class ids (positives first, sorted), ``local`` (B,) int64 the labels'
    positions in ``active`` (-1: no positive here), and ``logit_adjust``: None, or (S,) float32
    added to the active classes' logits before the loss (a sampled-softmax correction).
    """

    active: np.ndarray
    local: np.ndarray
    logit_adjust: np.ndarray | None = None


@dataclass(frozen=True)
class SelectionRule:
    """The one rule from (labels, index answer) to a batch's active classes, as plain fields.

    It is a value (JSON-able with ``dataclasses.asdict``) so that whoever holds the index, the
    trainer or a shard of the parameter server, applies exactly the same rule. ``seed`` and
    the step seed the uniform fill (``rng_for``): the same request gives the same active set
    wherever it is answered. ``hard_after``: steps of uniform negatives before the index's
    answers are used.
    """

    sample_num: int
    seed: int = 0
    hard_after: int = 0

    def wants_candidates(self, step: int) -> bool:
        """Whether this step's selection uses the index at all."""
        return step >= self.hard_after

    def rng_for(self, step: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, max(int(step), 0)])

    def select(self, labels: np.ndarray, ids: np.ndarray | None, scores: np.ndarray | None, num_classes: int,
               step: int) -> Selection:
        """Active classes of one batch from its labels and the index's (B, k) ids and similarities."""
        if not self.wants_candidates(step):
            ids = scores = None
        active, local = select_active_classes(labels, ids, self.sample_num, num_classes, self.rng_for(step))
        return Selection(active, local)
