"""OwnedIndex: the index over the rows of whoever holds them — a weight store, a store shard, a torch shard.

The holder owns the rows, so it owns their index: it builds it from its own memory (no copy
through a client), measures drift where every update is applied (it knows exactly which rows
changed and to what), and answers nearest-class queries for the trainers. The holder calls:

- ``search(features, k)``: (B, k') ids local to the holder and similarities; k' = 0 while no
  index is ready (the selection rule then fills with uniform negatives);
- ``rows_changed(rows, values)``: right after it applied an update to ``rows`` (drift, and
  in-place updates for the samplers whose ``update_cost`` allows them); ``values`` may be a
  function reading a subset of the rows, so only the rows drift is measured on are read;
- ``maybe_refresh(step)``: once per applied step (appends one snapshot chunk of a build in
  flight, swaps a finished build in, or starts one when the policy says so);
- ``advance()``: between steps, when the holder is idle (a server's loop): the same without
  starting a new build;
- ``upkeep()``, ``close()``.

What it is configured with is an :class:`IndexSpec`: a frozen, JSON-able value, so N trainers
of one job send the same spec to a shared server and it builds one index for all of them.
The index is never saved: after a restart it is rebuilt in the background while selection
falls back to uniform negatives.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np

from hfs.samplers.base import ClassSampler, empty_answer
from hfs.samplers.refresh import DriftTracker, IndexBuild, RefreshPolicy
from hfs.samplers.selection import Scorer, reranked
from hfs.samplers.registry import SAMPLERS
from hfs.utils.errors import HfsError
from hfs.utils.typed import field_values, rules

log = logging.getLogger(__name__)

#: consecutive failed index builds after which the index gives up (raises).
MAX_FAILED_BUILDS = 3
#: refresh modes a spec may name (RefreshPolicy.mode)
REFRESH_MODES = ("interval", "adaptive")


class IndexSpecError(HfsError):
    """An index spec that cannot be built (unknown sampler, bad field); the text names the field."""


@dataclass(frozen=True)
class IndexSpec:
    """Everything an index holder needs to build and refresh an index, as plain JSON-able fields.

    ``sampler`` names a registered sampler, ``kwargs`` its constructor arguments
    (``hfs.samplers.sampler_kwargs``); the refresh schedule is ``refresh``/``interval``/
    ``max_interval``/``drift_threshold`` (see :class:`RefreshPolicy`); ``background`` builds
    while the previous index keeps answering; ``update_threshold``/``update_budget``: in-place
    updates of a costly sampler; ``drift_rows``: changed rows measured per step (0 = all);
    ``chunk_rows``: rows per snapshot chunk; ``workdir``: where snapshot and annoy files go
    (a server uses its own and ignores the client's); ``seed``: the drift sample's stream.
    """

    sampler: str
    kwargs: dict[str, str | int | float | bool | None] = field(default_factory=dict)
    refresh: str = field(default="adaptive", metadata=rules(choices=REFRESH_MODES))
    interval: int = field(default=100, metadata=rules(gt=0, lt=2**40))
    max_interval: int = field(default=10000, metadata=rules(ge=0, lt=2**62))
    drift_threshold: float = field(default=0.05, metadata=rules(gt=0.0))
    background: bool = True
    update_threshold: float = field(default=0.1, metadata=rules(gt=0.0))
    update_budget: int = field(default=-1, metadata=rules(ge=-1, lt=2**62))
    drift_rows: int = field(default=128, metadata=rules(ge=0, lt=2**62))
    chunk_rows: int = field(default=32768, metadata=rules(gt=0, lt=2**40))
    workdir: str = ""
    seed: int = field(default=0, metadata=rules(ge=0, lt=2**62))

    @property
    def policy(self) -> RefreshPolicy:
        return RefreshPolicy(self.refresh, self.interval, self.max_interval, self.drift_threshold)

    def make_sampler(self) -> ClassSampler:
        return SAMPLERS.build(self.sampler, **self.kwargs)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Any) -> "IndexSpec":
        """A spec from its JSON object, every field checked against its annotation and rules
        (unknown, ill-typed or out of range: IndexSpecError), then :meth:`check`."""
        spec = cls(**field_values(cls, data, "index spec", error=IndexSpecError, finite=True))
        spec.check()
        return spec

    def check(self) -> None:
        """Raise IndexSpecError when ``sampler`` is not registered or does not take ``kwargs``."""
        if self.sampler not in SAMPLERS:
            raise IndexSpecError(f"index spec field 'sampler' {self.sampler!r} is not one of {', '.join(SAMPLERS.names())}")
        try:
            probe = self.make_sampler()
        except (TypeError, ValueError) as exc:
            raise IndexSpecError(f"index spec field 'kwargs' does not fit sampler {self.sampler!r}: {exc}") from None
        probe.close()


def _reader_of(rows: np.ndarray, values: object) -> Callable[[np.ndarray], np.ndarray]:
    """The values of any subset of ``rows`` (a repeated row: its first occurrence)."""
    unique, first = np.unique(rows, return_index=True)
    values = np.asarray(values, dtype=np.float32)
    return lambda wanted: values[first[np.searchsorted(unique, wanted)]]


class OwnedIndex:
    """A live index over ``shape`` rows that its holder keeps fresh; see the module docstring.

    ``read_chunks()`` returns a fresh iterator of (first_row, rows) over the holder's rows, ids
    local to the holder (0 .. rows-1), read at the current step (the store catches rows up).
    It is consumed from the holder's thread only (``maybe_refresh``/``advance``): one chunk
    per call is appended to a snapshot file that the build reads back (annoy builds in a
    child process from that file, hnsw and exact in a thread). The first snapshot is written
    at once when ``snapshot_at_once`` (nothing can be queried before it), else chunk by chunk
    like every later one (a server's loop must keep answering meanwhile); a foreground build
    (``spec.background`` false) is always complete when the constructor returns.
    """

    def __init__(self, spec: IndexSpec, shape: tuple[int, int],
                 read_chunks: Callable[[], Iterator[tuple[int, np.ndarray]]], *,
                 snapshot_at_once: bool = True) -> None:
        self.spec, self.num_rows, self.dim = spec, int(shape[0]), int(shape[1])
        self.policy = spec.policy
        self._read_chunks = read_chunks
        self._drift_rng = np.random.default_rng([spec.seed, 1])
        self._sampler: ClassSampler | None = None
        self._tracker: DriftTracker | None = None
        self._build: IndexBuild | None = None
        self._last_build_step = 0
        self._created = time.perf_counter()
        self._fg_seconds = self._bg_cpu_seconds = self._bg_wall_seconds = 0.0
        self._builds = self._rows_updated = self._failed_builds = 0
        probe = spec.make_sampler()
        self.update_cost = probe.update_cost
        self.uses_index = probe.needs_index and self.num_rows > 0
        self.fresh_scores, self.metric = probe.fresh_scores, probe.metric
        self._default_budget = probe.default_update_budget
        probe.close()
        if not self.uses_index:
            return
        t0 = time.perf_counter()
        self._launch(step=0)
        self._build.advance(max_chunks=1 << 30 if snapshot_at_once or not spec.background else 1)
        if not spec.background:
            self._swap_in()
        self._fg_seconds += time.perf_counter() - t0

    # -- queries -----------------------------------------------------------------------
    def search(self, features: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(B, k) holder-local ids (-1: none) and similarities (-inf), best first; (B, 0) while no index is ready."""
        features = np.asarray(features, dtype=np.float32)
        if self._sampler is None or k <= 0:
            return empty_answer(len(features), 0)
        t0 = time.perf_counter()
        ids, sims = self._sampler.search(features, min(int(k), self.num_rows))
        self._fg_seconds += time.perf_counter() - t0
        return ids, sims

    def answer(self, features: np.ndarray, k: int, scorer: Scorer | None = None, *,
               fresh: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """A step's (B, k') candidates and similarities; ``fresh``: under the current rows, an index
        that answers from stale rows being re-scored with ``scorer`` and re-ranked by them (its list is
        a pool to pick from, not a ranking). Holder-local ids."""
        ids, sims = self.search(features, k)
        if fresh and ids.shape[1] and not self.fresh_scores and scorer is not None:
            ids, sims = reranked(ids, scorer(ids))
        return ids, sims

    # -- the holder's updates --------------------------------------------------------------
    def rows_changed(self, rows: np.ndarray, values: np.ndarray | Callable[[np.ndarray], np.ndarray]) -> None:
        """``rows`` (holder-local ids) now hold ``values``: update drift, and the index in place where cheap enough.

        ``values``: the rows' values, or a function that reads them for any subset of ``rows``
        (a store passes one: an index that measures drift on ``drift_rows`` of them then reads
        only those, not every row a step changed)."""
        if self._tracker is None or not len(rows):
            return
        t0 = time.perf_counter()
        rows = np.asarray(rows, dtype=np.int64)
        read = values if callable(values) else _reader_of(rows, values)
        if rows.size > 1 and not np.all(rows[1:] > rows[:-1]):  # a store's applied rows are unique already
            rows = np.unique(rows)
        if self.update_cost == "cheap":
            self._update_in_place(rows, np.asarray(read(rows), dtype=np.float32))  # every row fresh again
        else:
            self._tracker.see(rows)
            if 0 < self.spec.drift_rows < len(rows):
                rows = rows[np.sort(self._drift_rng.choice(len(rows), self.spec.drift_rows, replace=False))]
            values = np.asarray(read(rows), dtype=np.float32)
            moved = self._tracker.observe(rows, values, self._sampler.indexed_rows(rows))
            budget = self.spec.update_budget if self.spec.update_budget >= 0 else self._default_budget
            if self.update_cost == "costly" and budget > 0:
                big = np.flatnonzero(moved >= self.spec.update_threshold)
                if big.size:
                    big = big[np.argsort(-moved[big], kind="stable")[:budget]]
                    self._update_in_place(rows[big], values[big])
        self._fg_seconds += time.perf_counter() - t0

    def maybe_refresh(self, step: int) -> None:
        """Advance a rebuild in flight (one snapshot chunk), swap a finished one in, or start one when due."""
        if not self.uses_index:
            return
        t0 = time.perf_counter()
        if self._build is not None:
            self._advance_build()
        elif self.policy.due(step - self._last_build_step, self.drift):
            self._launch(step)
            self._build.advance(max_chunks=1 if self.spec.background else 1 << 30)
            if not self.spec.background:
                self._swap_in()
        self._fg_seconds += time.perf_counter() - t0

    def advance(self) -> None:
        """Between steps: append one chunk of a build in flight or swap a finished one in (never starts one)."""
        if self._build is not None:
            t0 = time.perf_counter()
            self._advance_build()
            self._fg_seconds += time.perf_counter() - t0

    # -- reporting ---------------------------------------------------------------------------
    @property
    def drift(self) -> float:
        return self._tracker.drift if self._tracker is not None else 0.0

    @property
    def ready(self) -> bool:
        return self._sampler is not None

    @property
    def sampler(self) -> ClassSampler | None:
        """The live sampler (None while the first index is still being built)."""
        return self._sampler

    @property
    def building(self) -> bool:
        return self._build is not None

    def upkeep(self) -> dict:
        """Upkeep seconds (holder's thread, background CPU and wall), builds, drift, readiness."""
        bg_cpu, bg_wall = self._bg_cpu_seconds, self._bg_wall_seconds
        if self._build is not None:
            bg_cpu += self._build.bg_cpu_seconds
            bg_wall += self._build.bg_wall_seconds
        wall = max(time.perf_counter() - self._created, 1e-9)
        return {"sampler": self.spec.sampler, "fg_seconds": self._fg_seconds, "bg_cpu_seconds": bg_cpu,
                "bg_wall_seconds": bg_wall, "wall_seconds": wall, "fg_share": self._fg_seconds / wall,
                "bg_share": bg_cpu / wall, "builds": self._builds, "rebuilds": self._builds,
                "failed_builds": self._failed_builds, "rows_updated": self._rows_updated, "drift": self.drift,
                "index_ready": self.ready, "building": self.building}

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Block until a build in flight finishes and is swapped in (benchmarks and tests)."""
        if self._build is not None:
            t0 = time.perf_counter()
            self._build.advance(max_chunks=1 << 30)
            self._build.wait(timeout)
            if self._build.ready:
                self._swap_in()
            self._fg_seconds += time.perf_counter() - t0
        return self.ready

    def close(self) -> None:
        """Stop a build in flight and release the live index. Idempotent."""
        if self._build is not None:
            self._build.cancel()
            self._build = None
        if self._sampler is not None:
            self._sampler.close()
        self._sampler, self._tracker = None, None

    # -- internals ---------------------------------------------------------------------------
    def _advance_build(self) -> None:
        if not self._build.snapshot_complete:
            self._build.advance()
        elif self._build.ready:
            self._swap_in()

    def _launch(self, step: int) -> None:
        self._build = IndexBuild(self.spec.make_sampler, self._read_chunks(), (self.num_rows, self.dim), step,
                                 background=self.spec.background, workdir=self.spec.workdir)
        self._last_build_step = step

    def _swap_in(self) -> None:
        build, self._build = self._build, None
        if self.spec.background:
            self._bg_cpu_seconds += build.bg_cpu_seconds
            self._bg_wall_seconds += build.bg_wall_seconds
        try:
            sampler = build.take()
        except Exception as exc:
            self._failed_builds += 1
            if self._failed_builds >= MAX_FAILED_BUILDS:
                raise HfsError(f"{self._failed_builds} index builds in a row failed; last: {exc}") from exc
            log.warning("index build from the step-%d snapshot failed (%s); keeping the %s", build.started_step, exc,
                        "previous index" if self._sampler is not None else "uniform negatives")
            return
        self._failed_builds = 0
        old, self._sampler = self._sampler, sampler
        self._tracker = DriftTracker(self.num_rows, sampler.metric)
        self._builds += 1
        if old is not None:
            old.close()
        log.debug("swapped in a new %s index built from the step-%d snapshot", sampler.name, build.started_step)

    def _update_in_place(self, rows: np.ndarray, values: np.ndarray) -> None:
        if self._sampler is not None and self._sampler.update_rows(rows, values):
            self._tracker.accept(rows)
            self._rows_updated += len(rows)
