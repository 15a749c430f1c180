"""Keeping a class index fresh without stalling training — once, for every sampler.

Three pieces:

- :class:`RefreshPolicy` decides *when*: every ``interval`` steps (the paper), or
  ``adaptive``: when the measured drift reaches ``drift_threshold``, never more often than
  every ``interval`` steps and at the latest after ``max_interval`` steps.
- :class:`DriftTracker` measures *how stale* the live index is, cheaply: it keeps a float16
  copy of the matrix the index was built from and, for every row the trainer observes,
  the row's relative change ``|w - w_indexed| / |w_indexed|``. Drift is the mean of that
  over all classes (rows never observed since the build count as unchanged — in sampled
  training only active rows move).
- :class:`IndexBuild` does one rebuild: it copies the matrix from the store a chunk per
  step in the training thread (stores need not be thread-safe; a ZeroMQ socket is not),
  then builds a fresh sampler in a background thread — or, for indexes whose build holds
  the GIL (annoy), in a child process fed by a snapshot file — while queries keep using
  the previous index. The selector swaps the new index in, between two steps.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from hfs.samplers.base import ClassSampler, array_chunks
from hfs.utils.errors import HfsError


@dataclass(frozen=True)
class RefreshPolicy:
    """When to start a rebuild, given the steps since the last one started and the drift."""

    mode: str = "adaptive"
    interval: int = 100
    max_interval: int = 10000
    drift_threshold: float = 0.05

    def due(self, steps_since_build: int, drift: float) -> bool:
        if steps_since_build < self.interval:
            return False
        if self.mode == "interval" or drift >= self.drift_threshold:
            return True
        return self.max_interval > 0 and steps_since_build >= self.max_interval


class DriftTracker:
    """Per-row relative change of observed rows against the copy the live index holds."""

    def __init__(self, reference: np.ndarray) -> None:
        self.reference = reference  # float16 (C, D): what the index was built from
        self.change = np.zeros(reference.shape[0], dtype=np.float32)
        self._total = 0.0

    @property
    def drift(self) -> float:
        """Mean relative change over all classes since the index was built."""
        return self._total / max(len(self.change), 1)

    def observe(self, rows: np.ndarray, values: np.ndarray) -> np.ndarray:
        """Record fresh values of ``rows`` (unique ids); return their relative change."""
        old = self.reference[rows].astype(np.float32)
        moved = np.linalg.norm(values - old, axis=1) / np.maximum(np.linalg.norm(old, axis=1), 1e-12)
        self._total += float(moved.sum() - self.change[rows].sum())
        self.change[rows] = moved
        return moved

    def accept(self, rows: np.ndarray, values: np.ndarray) -> None:
        """The index now holds ``values`` for ``rows`` (an in-place update): they are fresh again."""
        self.reference[rows] = values
        self._total -= float(self.change[rows].sum())
        self.change[rows] = 0.0


def _package_root() -> str:
    import hfs

    return str(Path(hfs.__file__).resolve().parent.parent)


def build_in_child(sampler: ClassSampler, snapshot: np.ndarray, workdir: Path,
                   on_start: Callable[[subprocess.Popen], None] = lambda proc: None) -> float:
    """Build ``sampler``'s index in a child process from a snapshot file, then load it here.

    The caller removes ``workdir`` once the index is loaded. Returns the child's CPU seconds. ``on_start`` receives the child so that it can be cancelled.
    """
    snap_path, index_path, err_path = workdir / "snapshot.npy", workdir / "index.bin", workdir / "stderr.txt"
    np.save(snap_path, snapshot)
    spec = json.dumps({"name": sampler.name, "kwargs": sampler.spec()})
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([_package_root(), os.environ.get("PYTHONPATH", "")]))
    with open(err_path, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "hfs.samplers.build_worker", spec, str(snap_path),
                                 str(index_path)], env=env, stdout=subprocess.DEVNULL, stderr=err)
        on_start(proc)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    snap_path.unlink(missing_ok=True)
    if proc.returncode != 0:
        lines = err_path.read_text(errors="replace").strip().splitlines()
        raise HfsError(f"background '{sampler.name}' index build failed: {lines[-1] if lines else f'exit {proc.returncode}'}")
    sampler.load(index_path, *snapshot.shape)
    return usage.ru_utime + usage.ru_stime


class IndexBuild:
    """One rebuild of a sampler's index, from a snapshot of the store's matrix.

    ``advance()`` (training thread) copies the next chunk of the matrix; once the snapshot
    is complete it starts the build in the background (or runs it right there when
    ``background`` is False). ``ready`` turns true when the new sampler can be swapped in;
    ``take()`` hands it over with the float16 reference copy for drift tracking.
    """

    def __init__(self, make_sampler: Callable[[], ClassSampler], chunks: Iterator[tuple[int, np.ndarray]],
                 shape: tuple[int, int], started_step: int, *, background: bool = True,
                 workdir: str = "") -> None:
        self.make_sampler, self.started_step, self.background = make_sampler, started_step, background
        self.snapshot = np.empty(shape, dtype=np.float32)
        self._chunks, self._rows_read = chunks, 0
        self._workdir_root = workdir
        self._thread: threading.Thread | None = None
        self._result: tuple[ClassSampler, np.ndarray] | None = None
        self._error: BaseException | None = None
        self._child: subprocess.Popen | None = None
        self._cancelled = False
        self.bg_cpu_seconds = 0.0
        self.bg_wall_seconds = 0.0

    # -- training thread ----------------------------------------------------------------
    @property
    def snapshot_complete(self) -> bool:
        return self._rows_read >= self.snapshot.shape[0]

    @property
    def started(self) -> bool:
        return self._thread is not None or self._result is not None or self._error is not None

    @property
    def ready(self) -> bool:
        return self._result is not None or self._error is not None

    def advance(self, max_chunks: int = 1) -> None:
        """Copy up to ``max_chunks`` more chunks; start the build once the copy is complete."""
        for _ in range(max_chunks):
            if self.snapshot_complete:
                break
            start, rows = next(self._chunks)
            self.snapshot[start:start + len(rows)] = rows
            self._rows_read += len(rows)
        if self.snapshot_complete and not self.started:
            if self.background:
                self._thread = threading.Thread(target=self._run, name="hfs-index-build", daemon=True)
                self._thread.start()
            else:
                self._run()

    def take(self) -> tuple[ClassSampler, np.ndarray]:
        """The built sampler and the float16 copy it was built from."""
        if self._error is not None:
            raise self._error
        assert self._result is not None
        result, self._result = self._result, None
        return result

    def wait(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def cancel(self) -> None:
        """Stop a child-process build; a thread build finishes on its own and is dropped."""
        self._cancelled = True
        child = self._child
        if child is not None and child.returncode is None:
            child.kill()

    # -- build (background thread, or inline) ---------------------------------------------
    def _set_child(self, proc: subprocess.Popen) -> None:
        self._child = proc
        if self._cancelled:
            proc.kill()

    def _run(self) -> None:
        wall0, cpu0 = time.perf_counter(), time.thread_time()
        workdir: Path | None = None
        try:
            sampler = self.make_sampler()
            num_rows, dim = self.snapshot.shape
            if sampler.build_in_subprocess:
                root = self._workdir_root or None
                if root:
                    Path(root).mkdir(parents=True, exist_ok=True)
                workdir = Path(tempfile.mkdtemp(prefix="hfs-index-", dir=root))
                self.bg_cpu_seconds += build_in_child(sampler, self.snapshot, workdir, self._set_child)
                # The index is memory-mapped now; its file can go (the mapping keeps the
                # data), so a process that dies without close() leaves nothing behind.
                shutil.rmtree(workdir, ignore_errors=True)
                workdir = None
            else:
                sampler.rebuild(array_chunks(self.snapshot), num_rows, dim)
            reference = self.snapshot.astype(np.float16)
            self.snapshot = np.empty((0, dim), dtype=np.float32)
            if self._cancelled:
                sampler.close()
                return
            self._result = (sampler, reference)
        except BaseException as exc:  # surfaced in the training thread by take()
            if workdir is not None:
                shutil.rmtree(workdir, ignore_errors=True)
            self._error = exc if not self._cancelled else None
            if self._cancelled:
                return
        finally:
            self.bg_cpu_seconds += time.thread_time() - cpu0
            self.bg_wall_seconds += time.perf_counter() - wall0
