"""A confusion memory: per class, the classes that most recently scored highest against its samples.

No index over the rows at all. For each class ``c`` the memory keeps ``slots`` class ids
(``C x slots`` int32 and their last scores, float32): the classes that scored highest against
c's samples the last times c was in a batch. A batch's candidates for a sample of class ``c``
are ``c``'s members and their members (two hops, ``slots + slots^2`` classes: the nearest
classes of one's nearest classes are near too, the rule behind NN-descent), scored against
the sample's feature under the current rows by the holder of the rows. Each step the memory
learns from what was scored anyway:

- the candidates themselves (fresh scores: members that drifted away fall out, their own
  members move in);
- ``explore`` classes drawn uniformly from all, scored against the batch: the way in for
  classes no member knows yet (the active set's own uniform fill cannot be relied on: once
  the members are many, hard candidates take every free slot).

So nothing is ever stale by more than "the last time this class was in a batch", nothing
scans the C rows, and the cost is O(B x (slots^2 + explore) x D) per step at any C — what
keeps hard negatives affordable at millions of classes, where an exact scan costs a multiple
of the step and an approximate index is hundreds of steps old. This is "doppelganger mining"
(Smirnov et al., 2017) held in the weight store.

The memory is a :class:`~hfs.samplers.base.ClassSampler` that needs no build
(``needs_index`` False) and answers by label (``by_label`` True): its holder (the weight store,
the sharded classifier's selector) calls :meth:`MemorySampler.search_labels` and
:meth:`MemorySampler.learn`, and saves :meth:`MemorySampler.state` with its snapshots.
"""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np

from hfs.samplers.base import ClassSampler, empty_answer
from hfs.samplers.registry import SAMPLERS
from hfs.samplers.selection import Scorer


@SAMPLERS.register("memory")
class MemorySampler(ClassSampler):
    """The confusion memory (see the module docstring); ``slots`` members per class, ``hops`` 1 or 2,
    ``explore`` active classes scored per step to learn from."""

    name = "memory"
    needs_index = False
    by_label = True
    fresh_scores = True

    def __init__(self, metric: str = "cosine", slots: int = 8, hops: int = 2, explore: int = 1024,
                 symmetric: bool = True, seed: int = 0) -> None:
        if slots <= 0 or hops not in (0, 1, 2) or explore < 0:
            raise ValueError(f"memory needs slots > 0, hops 1 or 2 and explore >= 0, got {slots}, {hops}, {explore}")
        self.metric, self.slots, self.hops, self.explore, self.seed = metric, int(slots), int(hops), int(explore), seed
        self.symmetric = bool(symmetric)
        self.ids: np.ndarray | None = None
        self.scores: np.ndarray | None = None
        self._rng = np.random.default_rng([seed, 0xC0F])

    def spec(self) -> dict[str, Any]:
        return {"metric": self.metric, "slots": self.slots, "hops": self.hops, "explore": self.explore,
                "symmetric": self.symmetric, "seed": self.seed}

    # -- ClassSampler ------------------------------------------------------------------------
    def rebuild(self, chunks: Iterable[tuple[int, np.ndarray]], num_rows: int, dim: int) -> None:
        """An empty memory of ``num_rows`` classes (nothing is read: the memory learns as it goes)."""
        self.ids = np.full((num_rows, self.slots), -1, dtype=np.int32)
        self.scores = np.full((num_rows, self.slots), -np.inf, dtype=np.float32)

    def search(self, features: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """No label, no memory: a confusion memory answers by label only (:meth:`search_labels`)."""
        return empty_answer(len(features), 0)

    def close(self) -> None:
        self.ids = self.scores = None

    # -- by label ------------------------------------------------------------------------------
    def candidates(self, labels: np.ndarray) -> np.ndarray:
        """(B, slots [+ slots^2]) member ids of each query's class and, with two hops, their members; -1 pads."""
        labels = np.asarray(labels, dtype=np.int64)
        known = labels >= 0
        first = np.where(known[:, None], self.ids[np.where(known, labels, 0)], -1).astype(np.int64)
        if self.hops == 1:
            return first
        second = np.where((first >= 0)[:, :, None], self.ids[np.maximum(first, 0)], -1).astype(np.int64)
        return np.concatenate([first, second.reshape(len(labels), -1)], axis=1)

    def search_labels(self, labels: np.ndarray, k: int, scorer: Scorer) -> tuple[np.ndarray, np.ndarray]:
        """(B, k) candidate ids, best first under the current rows, and their fresh scores; the memory
        learns from those scores at once."""
        labels = np.asarray(labels, dtype=np.int64)
        if self.ids is None or k <= 0 or not labels.size:
            return empty_answer(len(labels), 0)
        if self.hops == 0:  # EXPERIMENT: no memory, the nearest of a fresh uniform probe
            probe = np.unique(self._rng.integers(0, self.ids.shape[0], size=max(self.explore, 1)))
            ids = _without_own(np.broadcast_to(probe, (labels.size, probe.size)).copy(), labels)
        else:
            ids = _without_own(self.candidates(labels), labels)
        scores = np.where(ids >= 0, scorer(ids), -np.inf).astype(np.float32)
        self.learn(labels, ids, scores)
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        ids, scores = np.take_along_axis(ids, order, 1), np.take_along_axis(scores, order, 1)
        return np.where(np.isfinite(scores), ids, -1), scores

    def explore_and_learn(self, labels: np.ndarray, scorer: Scorer) -> None:
        """Score ``explore`` classes drawn uniformly from all against the batch and learn from them:
        the way in for classes no member knows yet, whatever the active set holds."""
        labels = np.asarray(labels, dtype=np.int64)
        if self.ids is None or not self.explore or not (labels >= 0).any():
            return
        drawn = np.unique(self._rng.integers(0, self.ids.shape[0], size=self.explore))
        self.learn(labels, drawn, scorer(drawn))

    def learn(self, labels: np.ndarray, ids: np.ndarray, scores: np.ndarray) -> None:
        """Merge freshly scored candidates into the members of the queries' classes.

        ``ids``/``scores`` (B, n) (or (n,) ids shared by every query with (B, n) scores). Each
        class keeps the ``slots`` best of: its scored candidates over all its queries of this
        batch (a class scored by several of them: its best score) and its members that were not
        scored now (their last scores). A class is never its own member. ``symmetric``: a
        candidate that scored high against a sample of class c takes c among its own members
        too (confusion goes both ways), so a step teaches the candidates' classes as well.
        """
        labels = np.asarray(labels, dtype=np.int64)
        scores = np.asarray(scores, dtype=np.float32)
        ids = np.broadcast_to(np.asarray(ids, dtype=np.int64), scores.shape)
        known = labels >= 0
        if self.ids is None or not known.any() or not ids.size:
            return
        labels, ids, scores = labels[known], ids[known], scores[known]
        if ids.shape[1] > self.slots:  # a query's best `slots` are all it can contribute
            top = np.argpartition(-scores, self.slots - 1, axis=1)[:, :self.slots]
            ids, scores = np.take_along_axis(ids, top, 1), np.take_along_axis(scores, top, 1)
        owner, member, score = np.repeat(labels, ids.shape[1]), ids.ravel(), scores.ravel()
        valid = (member >= 0) & np.isfinite(score)
        owner, member, score = owner[valid], member[valid], score[valid]
        if self.symmetric:
            owner, member, score = np.concatenate([owner, member]), np.concatenate([member, owner]), np.tile(score, 2)
        self._merge(owner, member, score)

    def _merge(self, owner: np.ndarray, member: np.ndarray, score: np.ndarray) -> None:
        """Fold fresh (owner, member, score) triples into the owners' rows of the tables."""
        classes = np.unique(owner)
        if not classes.size:
            return
        fresh = np.concatenate([np.ones(owner.size, bool), np.zeros(classes.size * self.slots, bool)])
        owner = np.concatenate([owner, np.repeat(classes, self.slots)])
        member = np.concatenate([member, self.ids[classes].ravel().astype(np.int64)])
        score = np.concatenate([score, self.scores[classes].ravel()])
        keep = (member >= 0) & (member != owner) & np.isfinite(score)
        owner, member, score, fresh = owner[keep], member[keep], score[keep], fresh[keep]
        # one entry per (owner, member): a fresh score beats a remembered one, then the best score
        order = np.lexsort((-score, ~fresh, member, owner))
        owner, member, score = owner[order], member[order], score[order]
        first = np.ones(owner.size, bool)
        first[1:] = (owner[1:] != owner[:-1]) | (member[1:] != member[:-1])
        owner, member, score = owner[first], member[first], score[first]
        # each owner's best `slots`, best first
        order = np.lexsort((-score, owner))
        owner, member, score = owner[order], member[order], score[order]
        start = np.searchsorted(owner, classes)
        rank = np.arange(owner.size) - np.repeat(start, np.diff(np.append(start, owner.size)))
        kept = rank < self.slots
        self.ids[classes] = -1
        self.scores[classes] = -np.inf
        self.ids[owner[kept], rank[kept]] = member[kept]
        self.scores[owner[kept], rank[kept]] = score[kept]

    # -- snapshots -----------------------------------------------------------------------------
    def state(self) -> dict[str, np.ndarray]:
        """The members and their scores (what a snapshot saves)."""
        return {"ids": self.ids, "scores": self.scores}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        """Members saved by :meth:`state` (shapes checked against this memory)."""
        ids, scores = np.asarray(state["ids"]), np.asarray(state["scores"])
        if self.ids is None or ids.shape != self.ids.shape or scores.shape != self.scores.shape:
            have = None if self.ids is None else self.ids.shape
            raise ValueError(f"saved confusion memory has shape {ids.shape}, this one {have}")
        self.ids[...] = ids
        self.scores[...] = scores

    def filled(self) -> float:
        """Share of the member slots in use."""
        return float((self.ids >= 0).mean()) if self.ids is not None else 0.0


def _without_own(ids: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """``ids`` with each query's own class (and duplicates of an earlier entry) set to -1."""
    ids = np.where(ids == labels[:, None], -1, ids)
    if ids.shape[1] > 1:
        order = np.argsort(ids, axis=1, kind="stable")
        s = np.take_along_axis(ids, order, 1)
        dup = np.zeros_like(s, dtype=bool)
        dup[:, 1:] = (s[:, 1:] == s[:, :-1]) & (s[:, 1:] >= 0)
        back = np.empty_like(dup)
        np.put_along_axis(back, order, dup, 1)
        ids = np.where(back, -1, ids)
    return ids
