"""ActiveClassSelector: an :class:`OwnedIndex` plus the selection rule, for a holder that is also the asker.

The weight store answers ``select`` from its own index (``WeightStore.select``); a holder
that keeps its rows itself and asks its own index — the sharded classifier (each rank's
shard is a torch parameter), the sampler benchmark (a numpy matrix) — uses this: per step
``select`` (active classes for the batch), ``observe`` with the rows' fresh values (they
changed in the holder: drift, in-place updates), and ``maybe_refresh(step)``. Everything
besides ``select`` is *upkeep*, reported by ``upkeep()``.
"""

from __future__ import annotations

import logging
from typing import Callable, Iterator

import numpy as np

from hfs.samplers.owned import IndexSpec, OwnedIndex
from hfs.samplers.base import empty_answer
from hfs.samplers.selection import Selection, SelectionRule, find_candidates, rows_scorer

log = logging.getLogger(__name__)


class ActiveClassSelector:
    """Active classes per batch from a live index that is refreshed without stalling training.

    With ``sample_num >= num_classes`` every class is active and no index is ever built;
    the ``random`` sampler has no index either. Otherwise the first index is built at
    construction — in the background when ``spec.background`` is set, so the first steps run
    with uniform negatives only, exactly like the ``random`` sampler, until it is ready.
    """

    def __init__(self, spec: IndexSpec, read_chunks: Callable[[], Iterator[tuple[int, np.ndarray]]],
                 shape: tuple[int, int], *, rule: SelectionRule, neighbours: int,
                 read_rows: Callable[[np.ndarray], np.ndarray] | None = None) -> None:
        self.num_classes, self.dim = shape
        self.rule, self.neighbours = rule, neighbours
        self._read_rows = read_rows  # current values of rows: what a ceiling and a memory score against
        self.sample_num = rule.sample_num
        self._warned_overflow = False
        self.index = OwnedIndex(spec if rule.sample_num < self.num_classes else _no_index(spec), shape, read_chunks)
        self.update_cost = self.index.update_cost
        self.uses_index = self.index.uses_index

    def select(self, features: np.ndarray | None, labels: np.ndarray, step: int) -> Selection:
        """Active class ids (S,) int64, the labels' positions in them (B,) int64 and the rule's
        logit adjustment (unpacks as ``active, local``).

        ``features`` may be None when ``uses_index`` is False (no index queries them)."""
        rule = self.rule
        scorer = self._scorer(features) if rule.needs_scorer else None

        def search(asking: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            if not (self.uses_index and self.index.ready):
                return empty_answer(len(asking), 0)
            fresh = rule.compares_candidates
            return self.index.answer(asking, self.neighbours, self._scorer(asking) if fresh else None, fresh=fresh)

        ids, scores, measured = find_candidates(rule, labels, features, self.num_classes, step, search, scorer)
        chosen = rule.select(labels, ids, scores, self.num_classes, step, scorer, measured)
        if len(chosen.active) > rule.sample_num and not self._warned_overflow:
            self._warned_overflow = True
            log.warning("batch at step %d has %d distinct labels, more than sampler sample_num=%d: keeping all "
                        "positives (said once)", step, len(chosen.active), rule.sample_num)
        return chosen

    def _scorer(self, features: np.ndarray):
        """The rule's scorer over the holder's current rows (None when the holder gave no reader)."""
        if self._read_rows is None or features is None:
            return None
        return rows_scorer(features, self.index.metric, self._read_rows)

    def observe(self, rows: np.ndarray, values: np.ndarray) -> None:
        """Fresh values of rows that changed in the holder (see ``OwnedIndex.rows_changed``)."""
        self.index.rows_changed(rows, values)

    def maybe_refresh(self, step: int) -> None:
        self.index.maybe_refresh(step)

    @property
    def drift(self) -> float:
        return self.index.drift

    @property
    def index_ready(self) -> bool:
        return self.index.ready

    @property
    def sampler(self):
        """The live sampler (None while the first index is still being built)."""
        return self.index.sampler

    def upkeep(self) -> dict:
        return self.index.upkeep()

    def wait_ready(self, timeout: float | None = None) -> bool:
        return self.index.wait_ready(timeout)

    def close(self) -> None:
        self.index.close()


def _no_index(spec: IndexSpec) -> IndexSpec:
    """Every class is active: the same spec over the index-free ``random`` sampler."""
    from dataclasses import replace

    return replace(spec, sampler="random", kwargs={"metric": spec.kwargs.get("metric", "cosine")})
