"""The index over each matrix's rows, and the selection a store answers from it.

The store owns the rows, so it owns their index (:class:`~hfs.samplers.owned.OwnedIndex`, one
per matrix, from an :class:`~hfs.samplers.owned.IndexSpec` a trainer attaches): built from
the store's own memory, chunk by chunk (a server answering requests meanwhile), shown every
row a step or a set changes, refreshed once per applied step and between requests. An index
that fails is dropped, not the step that fed it: selection falls back to uniform negatives.

:class:`MatrixIndexes` keeps them; :meth:`MatrixIndexes.search` answers queries' candidates as
global row ids and :meth:`MatrixIndexes.choose` runs the selection rule's flow over it
(``find_candidates``, then the rule), with the rule's scorer over the store's current rows
(:func:`~hfs.samplers.selection.rows_scorer`). It takes no lock: the
store calls it under its own.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import time
from typing import Callable, Iterator

import numpy as np

from hfs.paramserver.base import StoreError
from hfs.paramserver.matrix import Matrix, as_rows
from hfs.samplers.owned import IndexSpec, OwnedIndex
from hfs.samplers.base import empty_answer
from hfs.samplers.selection import Scorer, Selection, find_candidates, rows_scorer

log = logging.getLogger(__name__)

#: Most candidates a select may ask per query, and most (queries x candidates) per request.
MAX_SELECT_K = 1 << 16
MAX_SELECT_CANDIDATES = 1 << 24
#: Shortest spacing of the snapshot chunks ``advance_all`` appends between steps (a server's idle loop).
INDEX_TICK_S = 0.05

#: ``chunks(name, chunk_rows)``: the store's caught-up rows of a matrix, (first local row, copy) each
ChunkReader = Callable[[str, int], Iterator[tuple[int, np.ndarray]]]


def matrix_scorer(m: Matrix, features: np.ndarray, metric: str) -> Scorer:
    """:func:`rows_scorer` over this store's rows of ``m`` (caught up as a read would), global ids;
    a shard's rows answer their own ids only."""
    return rows_scorer(features, metric, lambda ids: m.read(np.asarray(ids, dtype=np.int64) - m.row_start))


def check_query(m: Matrix, features: object, k: object) -> tuple[np.ndarray, int]:
    """A select's features (finite float32 (B, dim)) and ``k`` (0..rows, bounded), or a StoreError naming the field."""
    arr = np.asarray(features)
    if arr.dtype != np.float32 or arr.ndim != 2 or arr.shape[1] != m.dim:
        raise StoreError(f"features for matrix {m.name!r} must be float32 of shape (B, {m.dim}), "
                         f"got {arr.dtype}{list(arr.shape)}")
    if not np.isfinite(arr).all():
        raise StoreError(f"features for matrix {m.name!r} contain NaN or infinity")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 0 <= k <= min(m.num_rows, MAX_SELECT_K):
        raise StoreError(f"k must be an integer in 0..{min(m.num_rows, MAX_SELECT_K)} (the matrix's rows), got {k!r}")
    if arr.shape[0] * int(k) > MAX_SELECT_CANDIDATES:
        raise StoreError(f"{arr.shape[0]} queries x k={k} exceeds {MAX_SELECT_CANDIDATES} candidates per request")
    return arr, int(k)


def check_labels(m: Matrix, labels: object, features: object, with_rows: bool) -> np.ndarray:
    """A select's labels (one per feature row, in [0, rows) or -1), or a StoreError; with rows, the
    store must hold the whole matrix (a shard answers candidates, merged by its client)."""
    labels = as_rows(labels, "labels")
    if labels.shape[0] != np.shape(features)[0]:
        raise StoreError(f"{labels.shape[0]} labels for {np.shape(features)[0]} feature rows")
    if labels.size and (labels.min() < -1 or labels.max() >= m.num_rows):
        raise StoreError(f"labels must be in [0, {m.num_rows}) (or -1: no positive), got "
                         f"{labels.min()}..{labels.max()}")
    if with_rows and (m.row_start, m.row_end) != (0, m.num_rows):
        raise StoreError(f"select with rows needs the whole matrix {m.name!r}; this shard holds rows "
                         f"{m.row_start}..{m.row_end}: ask every shard for candidates and merge them")
    return labels


class MatrixIndexes:
    """One :class:`OwnedIndex` per matrix that has one attached, over this store's rows of it.

    ``chunks`` reads a matrix's rows for a build (the store's, taking its lock per chunk);
    ``workdir``, when set (a server), replaces every spec's ``workdir``: index files never go
    where a client names.
    """

    def __init__(self, chunks: ChunkReader, workdir: str | None = None) -> None:
        self._chunks = chunks
        self.workdir = workdir
        self._indexes: dict[str, OwnedIndex] = {}
        self._last_tick = 0.0
        self.counters: collections.Counter = collections.Counter(index_attaches=0, index_failures=0)

    def get(self, name: str) -> OwnedIndex | None:
        return self._indexes.get(name)

    def attach(self, m: Matrix, spec: IndexSpec) -> bool:
        """See WeightStore.attach_index: a build started (True), or the same spec already there."""
        if not isinstance(spec, IndexSpec):
            raise StoreError(f"index spec must be an IndexSpec, got {type(spec).__name__}")
        if self.workdir is not None:
            spec = dataclasses.replace(spec, workdir=self.workdir)
        have = self._indexes.get(m.name)
        if have is not None and have.spec == spec:
            return False
        if have is not None:
            log.info("matrix %s: index spec changed; replacing its %s index", m.name, have.spec.sampler)
            have.close()
        self.counters["index_attaches"] += 1
        self._indexes[m.name] = self._new_index(m, spec)
        return True

    def _new_index(self, m: Matrix, spec: IndexSpec) -> OwnedIndex:
        name = m.name
        # the first snapshot chunk by chunk too (per applied step, per tick): a server answering
        # `index` must not stall its loop for a C x D x 4-byte write
        index = OwnedIndex(spec, m.weight.shape, lambda: self._chunks(name, spec.chunk_rows), snapshot_at_once=False)
        if index.uses_index:
            log.info("matrix %s: building a %s index over rows %d..%d%s", name, spec.sampler, m.row_start, m.row_end,
                     " in the background; uniform negatives until it is ready" if not index.ready else "")
        return index

    def rebuild(self, matrices: dict[str, Matrix]) -> None:
        """After a restore: the index is not saved, so each is built again from the restored rows."""
        for name, index in list(self._indexes.items()):
            index.close()
            del self._indexes[name]
            if name in matrices:
                log.info("matrix %s: indexes are not saved; rebuilding it from the restored rows", name)
                self._indexes[name] = self._new_index(matrices[name], index.spec)

    # -- upkeep ----------------------------------------------------------------------------
    def after_step(self, m: Matrix, unique: np.ndarray, step: int) -> None:
        """Drift where the update is applied: the index sees the rows it just changed, then its refresh."""
        if m.name not in self._indexes:
            return

        def upkeep(index: OwnedIndex) -> None:
            if index.ready and unique.size:
                index.rows_changed(unique, lambda rows: m.weight[rows])  # reads only the rows it measures
            index.maybe_refresh(step)

        self._upkeep(m.name, upkeep)

    def rows_set(self, m: Matrix, changed: np.ndarray) -> None:
        """The index sees rows a ``set`` overwrote, as after a step."""
        if m.name in self._indexes and changed.size:
            self._upkeep(m.name, lambda index: index.rows_changed(changed, lambda rows: m.weight[rows]))

    def advance_all(self) -> None:
        """Between requests (a server's idle loop): one snapshot chunk per ``INDEX_TICK_S``, a finished
        build swapped in."""
        now = time.monotonic()
        if self._indexes and now - self._last_tick >= INDEX_TICK_S:
            self._last_tick = now
            for name in list(self._indexes):
                self._upkeep(name, lambda index: index.advance())

    def _upkeep(self, name: str, work: Callable[[OwnedIndex], None]) -> None:
        """Run ``work(index)``; an index that fails is dropped (selection falls back to uniform
        negatives) instead of failing the step that was just applied."""
        index = self._indexes.get(name)
        if index is None:
            return
        try:
            work(index)
        except Exception as exc:  # noqa: BLE001 - the store must go on serving rows
            self.counters["index_failures"] += 1
            log.error("matrix %s: dropping its %s index (%s); uniform negatives from now on", name,
                      index.spec.sampler, exc)
            index.close()
            self._indexes.pop(name, None)

    def stats(self, name: str) -> dict:
        index = self._indexes.get(name)
        return index.upkeep() if index is not None else {}

    def upkeep(self) -> dict[str, dict]:
        return {name: index.upkeep() for name, index in self._indexes.items()}

    def close(self) -> None:
        """Stop builds in flight and release the indexes. Idempotent."""
        indexes, self._indexes = self._indexes, {}
        for index in indexes.values():
            index.close()

    # -- selection -------------------------------------------------------------------------
    def search(self, m: Matrix, features: np.ndarray, k: int, *, fresh: bool) -> tuple[np.ndarray, np.ndarray]:
        """(B, k') global ids and similarities of this store's best rows of ``m`` per query (k' = 0
        while no index is ready); ``fresh``: similarities under the current rows (``OwnedIndex.answer``)."""
        index = self._indexes.get(m.name)
        if index is None or not index.ready or k == 0:
            return empty_answer(len(features), 0)
        local_scorer = None
        if fresh:  # re-scoring reads every candidate row: only for a rule that compares them
            scorer = matrix_scorer(m, features, index.metric)
            local_scorer = lambda local: scorer(m.global_ids(local))  # noqa: E731
        ids, sims = index.answer(features, k, local_scorer, fresh=fresh)
        return m.global_ids(ids), sims

    def choose(self, m: Matrix, features: np.ndarray, labels: np.ndarray, k: int, step: int, rule) -> Selection:
        """The rule's selection for step ``step``: the candidates of the queries the rule lets ask
        (``find_candidates``, the one flow of every holder: :meth:`search` for those alone), then the
        rule, both seeing the current rows through the same scorer."""
        index = self._indexes.get(m.name)
        metric = index.metric if index is not None else "cosine"

        def search(asking: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            return self.search(m, asking, k, fresh=rule.compares_candidates)

        try:
            scorer = matrix_scorer(m, features, metric) if rule.needs_scorer else None
            ids, sims, measured = find_candidates(rule, labels, features, m.num_rows, int(step), search, scorer)
            return rule.select(labels, ids, sims, m.num_rows, int(step), scorer=scorer, measured=measured)
        except ValueError as exc:
            raise StoreError(f"select on matrix {m.name!r}: {exc}") from None
