"""ActiveClassSelector: what the trainer holds — a sampler, its refresh policy and upkeep clock.

Per step the trainer calls ``select`` (active classes for the batch), fetches those rows,
trains, calls ``observe`` with the rows' fresh values, and ``maybe_refresh(step)``.
Everything the selector does besides answering ``select`` is *upkeep*; its cost in the
training thread and in the background is what ``upkeep()`` reports.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Iterator

import numpy as np

from hfs.samplers.base import ClassSampler
from hfs.samplers.refresh import DriftTracker, IndexBuild, RefreshPolicy, RemoteMatrix
from hfs.samplers.selection import Selection, SelectionRule
from hfs.utils.errors import HfsError

log = logging.getLogger(__name__)

#: consecutive failed index builds after which the selector gives up (raises).
MAX_FAILED_BUILDS = 3


class ActiveClassSelector:
    """Active classes per batch from a live index that is refreshed without stalling training.

    With ``sample_num >= num_classes`` every class is active and no index is ever built;
    the ``random`` sampler has no index either. Otherwise the first index is built at
    construction — in the background when ``background`` is set, so the first steps run
    with uniform negatives only, exactly like the ``random`` sampler, until it is ready.
    """

    def __init__(self, make_sampler: Callable[[], ClassSampler], read_chunks: Callable[[], Iterator[tuple[int, np.ndarray]]],
                 shape: tuple[int, int], *, sample_num: int, neighbours: int, policy: RefreshPolicy,
                 background: bool = True, update_threshold: float = 0.1, update_budget: int = 16,
                 seed: int = 0, workdir: str = "", remote: RemoteMatrix | None = None, drift_rows: int = 0,
                 hard_after: int = 0, rule: SelectionRule | None = None) -> None:
        self.num_classes, self.dim = shape
        self.sample_num, self.neighbours, self.policy = sample_num, neighbours, policy
        self.background, self.update_threshold, self.update_budget = background, update_threshold, update_budget
        self.drift_rows, self.hard_after = drift_rows, hard_after
        self._drift_rng = np.random.default_rng([seed, 1])  # apart from the fill's stream: selection stays as it was
        self._make_sampler, self._read_chunks, self._workdir, self._remote = make_sampler, read_chunks, workdir, remote
        self.rule = rule or SelectionRule(sample_num, seed=seed, hard_after=hard_after)
        self._warned_overflow = False
        self._sampler: ClassSampler | None = None
        self._tracker: DriftTracker | None = None
        self._build: IndexBuild | None = None
        self._last_build_step = 0
        self._created = time.perf_counter()
        self._fg_seconds = self._bg_cpu_seconds = self._bg_wall_seconds = 0.0
        self._rebuilds = self._rows_updated = self._failed_builds = 0
        probe = make_sampler()
        self.update_cost = probe.update_cost
        self.uses_index = probe.needs_index and sample_num < self.num_classes
        if not self.uses_index:
            self._sampler = probe
            return
        probe.close()
        t0 = time.perf_counter()
        self._launch(step=0)
        self._build.advance(max_chunks=1 << 30)  # the first snapshot at once: nothing to query yet
        if not background:
            self._swap_in()
        self._fg_seconds += time.perf_counter() - t0

    # -- per step --------------------------------------------------------------------------
    def select(self, features: np.ndarray | None, labels: np.ndarray, step: int,
               rule: SelectionRule | None = None) -> Selection:
        """Active class ids (S,) int64, the labels' positions in them (B,) int64 and the rule's
        logit adjustment (unpacks as ``active, local``).

        ``features`` may be None when ``uses_index`` is False (no index queries them). ``rule``
        replaces this selector's rule for the step (adaptive allocation's ``sample_num``)."""
        sampler = self._sampler
        rule = rule or self.rule
        ids = scores = None
        if self.uses_index and sampler is not None and rule.wants_candidates(step):
            ids, scores = sampler.search(np.asarray(features, dtype=np.float32), self.neighbours)
        chosen = rule.select(labels, ids, scores, self.num_classes, step)
        if len(chosen.active) > rule.sample_num and not self._warned_overflow:
            self._warned_overflow = True
            log.warning("batch at step %d has %d distinct labels, more than sampler sample_num=%d: keeping all "
                        "positives (said once)", step, len(chosen.active), rule.sample_num)
        return chosen

    def observe(self, rows: np.ndarray, values: np.ndarray) -> None:
        """Fresh values of rows the trainer fetched: update drift, and the index in place where cheap enough."""
        if self._tracker is None or not len(rows):
            return
        t0 = time.perf_counter()
        rows = np.asarray(rows, dtype=np.int64)
        values = np.asarray(values, dtype=np.float32)
        rows, first = np.unique(rows, return_index=True)
        values = values[first]
        if self.update_cost == "cheap":
            self._update_in_place(rows, values)  # every row fresh again: nothing to measure
        else:
            self._tracker.see(rows)
            if 0 < self.drift_rows < len(rows):
                pick = np.sort(self._drift_rng.choice(len(rows), self.drift_rows, replace=False))
                rows, values = rows[pick], values[pick]
            moved = self._tracker.observe(rows, values, self._sampler.indexed_rows(rows))
            if self.update_cost == "costly" and self.update_budget > 0:
                big = np.flatnonzero(moved >= self.update_threshold)
                if big.size:
                    big = big[np.argsort(-moved[big], kind="stable")[:self.update_budget]]
                    self._update_in_place(rows[big], values[big])
        self._fg_seconds += time.perf_counter() - t0

    def maybe_refresh(self, step: int) -> None:
        """Advance a rebuild in flight (one snapshot-file chunk per step), swap a finished one in, or start one."""
        if not self.uses_index:
            return
        t0 = time.perf_counter()
        if self._build is not None:
            if not self._build.snapshot_complete:
                self._build.advance()
            elif self._build.ready:
                self._swap_in()
        elif self.policy.due(step - self._last_build_step, self.drift):
            self._launch(step)
            self._build.advance(max_chunks=1 if self.background else 1 << 30)
            if not self.background:
                self._swap_in()
        self._fg_seconds += time.perf_counter() - t0

    # -- reporting ---------------------------------------------------------------------------
    @property
    def drift(self) -> float:
        return self._tracker.drift if self._tracker is not None else 0.0

    @property
    def index_ready(self) -> bool:
        return self._sampler is not None

    @property
    def sampler(self) -> ClassSampler | None:
        """The live sampler (None while the first index is still being built)."""
        return self._sampler

    def upkeep(self) -> dict:
        """Upkeep seconds (training thread, background CPU and wall), rebuilds, shares of wall time."""
        bg_cpu, bg_wall = self._bg_cpu_seconds, self._bg_wall_seconds
        if self._build is not None:
            bg_cpu += self._build.bg_cpu_seconds
            bg_wall += self._build.bg_wall_seconds
        wall = max(time.perf_counter() - self._created, 1e-9)
        return {"fg_seconds": self._fg_seconds, "bg_cpu_seconds": bg_cpu, "bg_wall_seconds": bg_wall,
                "wall_seconds": wall, "fg_share": self._fg_seconds / wall, "bg_share": bg_cpu / wall,
                "rebuilds": self._rebuilds, "failed_builds": self._failed_builds,
                "rows_updated": self._rows_updated, "drift": self.drift,
                "index_ready": self.index_ready, "building": self._build is not None}

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Block until a build in flight finishes and is swapped in (benchmarks and tests)."""
        if self._build is not None:
            t0 = time.perf_counter()
            self._build.advance(max_chunks=1 << 30)
            self._build.wait(timeout)
            if self._build.ready:
                self._swap_in()
            self._fg_seconds += time.perf_counter() - t0
        return self.index_ready

    def close(self) -> None:
        """Stop a build in flight and release the live index. Idempotent."""
        if self._build is not None:
            self._build.cancel()
            self._build = None
        if self._sampler is not None:
            self._sampler.close()
        self._sampler, self._tracker = None, None

    # -- internals ---------------------------------------------------------------------------
    def _launch(self, step: int) -> None:
        self._build = IndexBuild(self._make_sampler, self._read_chunks(), (self.num_classes, self.dim), step,
                                 background=self.background, workdir=self._workdir, remote=self._remote)
        self._last_build_step = step

    def _swap_in(self) -> None:
        build, self._build = self._build, None
        if self.background:
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
        self._tracker = DriftTracker(self.num_classes, sampler.metric)
        self._rebuilds += 1
        if old is not None:
            old.close()
        log.debug("swapped in a new %s index built from the step-%d snapshot", sampler.name, build.started_step)

    def _update_in_place(self, rows: np.ndarray, values: np.ndarray) -> None:
        if self._sampler is not None and self._sampler.update_rows(rows, values):
            self._tracker.accept(rows)
            self._rows_updated += len(rows)
