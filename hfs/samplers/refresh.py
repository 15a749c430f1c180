"""Keeping a class index fresh without stalling training — once, for every sampler.

Three pieces:

- :class:`RefreshPolicy` decides *when*: every ``interval`` steps (the paper), or
  ``adaptive``: when the measured drift reaches ``drift_threshold``, never more often than
  every ``interval`` steps and at the latest after ``max_interval`` steps.
- :class:`DriftTracker` measures *how stale* the live index is, cheaply and without a copy
  of the matrix: for the observed rows it measures (all, or a random ``drift_rows`` of
  them per step) it compares the row's fresh value with the vector the index itself stores
  for it (``ClassSampler.indexed_rows``), keeping a float32 change and a seen flag per
  class. Drift estimates the mean change over all classes (rows never observed since the
  build count as unchanged — in sampled training only active rows move).
- :class:`IndexBuild` does one rebuild while queries keep using the previous index; its
  holder (:class:`~hfs.samplers.owned.OwnedIndex`, kept by whoever owns the rows: the weight
  store, a server shard, a sharded classifier) swaps the new one in between two steps. The
  holder's thread appends one chunk of its own rows per step to a snapshot *file*, which the
  build reads back chunk by chunk, so a build never needs a second copy of the matrix in
  memory. Indexes whose build holds the GIL (annoy) are built by a child process and loaded
  with ``mmap``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

import numpy as np

from hfs.samplers.base import ClassSampler, normalise_rows
from hfs.utils.errors import HfsError

log = logging.getLogger(__name__)

#: rows per chunk when a build reads a snapshot file back.
FILE_CHUNK_ROWS = 65536


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
    """Relative change of observed rows against the vectors the live index holds for them.

    With the cosine metric both sides are normalised first (hnsw and exact store unit
    vectors; annoy's angular index stores raw ones), so drift is the change of a row's
    *direction* — all a cosine neighbour query sees. With ``dot`` it is
    ``|w - w_indexed| / |w_indexed|``. Drift = (rows observed since the build / all rows) x
    the mean change of the rows measured (every observed row when all are measured: then it
    is exactly the mean change over all classes, unobserved rows counting as unchanged).
    State: a float32 change (NaN = never measured) and a seen flag per class, 5 bytes.
    """

    def __init__(self, num_rows: int, metric: str = "cosine") -> None:
        self.metric = metric
        self.change = np.full(num_rows, np.nan, dtype=np.float32)
        self.seen = np.zeros(num_rows, dtype=bool)
        self._total, self._measured, self._seen = 0.0, 0, 0

    @property
    def drift(self) -> float:
        """Estimated mean relative change over all classes since the index was built."""
        if not self._measured:
            return 0.0
        return self._total / self._measured * self._seen / max(len(self.change), 1)

    def see(self, rows: np.ndarray) -> None:
        """``rows`` (unique ids) were observed, measured or not."""
        fresh = ~self.seen[rows]
        self._seen += int(fresh.sum())
        self.seen[rows] = True

    def observe(self, rows: np.ndarray, values: np.ndarray, indexed: np.ndarray) -> np.ndarray:
        """Record fresh ``values`` of ``rows`` (unique ids) against the index's ``indexed``; return their change."""
        values, indexed = np.asarray(values, dtype=np.float32), np.asarray(indexed, dtype=np.float32)
        if self.metric == "cosine":
            values, indexed = normalise_rows(values), normalise_rows(indexed)
        moved = np.linalg.norm(values - indexed, axis=1) / np.maximum(np.linalg.norm(indexed, axis=1), 1e-12)
        self._record(rows, moved.astype(np.float32))
        return moved

    def accept(self, rows: np.ndarray) -> None:
        """The index now holds the rows' fresh values (an in-place update): they are unchanged again."""
        self._record(rows, np.zeros(len(rows), dtype=np.float32))

    def _record(self, rows: np.ndarray, moved: np.ndarray) -> None:
        self.see(rows)
        old = self.change[rows]
        unmeasured = np.isnan(old)
        self._measured += int(unmeasured.sum())
        self._total += float(moved.sum() - np.where(unmeasured, 0.0, old).sum())
        self.change[rows] = moved


def write_npy_header(out: BinaryIO, shape: tuple[int, int]) -> None:
    """A float32 C-order .npy header; the rows follow as raw bytes."""
    np.lib.format.write_array_header_1_0(out, {"descr": "<f4", "fortran_order": False, "shape": tuple(shape)})


def read_npy_chunks(path: str | Path, chunk_rows: int = FILE_CHUNK_ROWS) -> Iterator[tuple[int, np.ndarray]]:
    """(first_row, rows) chunks of a 2-D float32 .npy, read with plain reads (no mapping stays resident)."""
    with open(path, "rb") as src:
        version = np.lib.format.read_magic(src)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        (num_rows, dim), fortran, dtype = read_header(src)
        if fortran or dtype != np.float32:
            raise HfsError(f"{path}: expected a C-order float32 matrix, got {dtype} (fortran={fortran})")
        for start in range(0, num_rows, chunk_rows):
            count = min(chunk_rows, num_rows - start)
            yield start, np.fromfile(src, dtype=np.float32, count=count * dim).reshape(count, dim)


WORKDIR_PREFIX = "hfs-index-"
OWNER_FILE = "owner.pid"


def _process_alive(pid: int) -> bool:
    """Signal 0 probes a pid; a PermissionError means it is alive but someone else's."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def remove_stale_workdirs(root: Path) -> None:
    """Delete build folders whose owning process is gone (killed mid-build: a snapshot is C x D x 4 bytes)."""
    for folder in root.glob(WORKDIR_PREFIX + "*"):
        try:
            pid = int((folder / OWNER_FILE).read_text())
        except (OSError, ValueError):
            continue  # not ours, or being created right now
        if not _process_alive(pid):
            log.info("removing %s, left by process %d that ended mid-build", folder, pid)
            shutil.rmtree(folder, ignore_errors=True)


def _package_root() -> str:
    import hfs

    return str(Path(hfs.__file__).resolve().parent.parent)


def build_in_child(sampler: ClassSampler, source: dict, shape: tuple[int, int], workdir: Path,
                   on_start: Callable[[subprocess.Popen], None] = lambda proc: None) -> float:
    """Build ``sampler``'s index in a child process, then load it here (``mmap``).

    ``source`` is ``{"snapshot": path}`` (a float32 .npy of the rows). The caller removes
    ``workdir`` once the index is loaded. Returns the child's CPU seconds. ``on_start``
    receives the child so that it can be cancelled.
    """
    index_path, err_path = workdir / "index.bin", workdir / "stderr.txt"
    spec = json.dumps({"name": sampler.name, "kwargs": sampler.spec()})
    source = dict(source, shape=list(shape))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([_package_root(), os.environ.get("PYTHONPATH", "")]))
    with open(err_path, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "hfs.samplers.build_worker", spec, json.dumps(source),
                                 str(index_path)], env=env, stdout=subprocess.DEVNULL, stderr=err)
        on_start(proc)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        lines = err_path.read_text(errors="replace").strip().splitlines()
        raise HfsError(f"background '{sampler.name}' index build failed: {lines[-1] if lines else f'exit {proc.returncode}'}")
    sampler.load(index_path, *shape)
    return usage.ru_utime + usage.ru_stime


class IndexBuild:
    """One rebuild of a sampler's index, without a copy of the matrix in the trainer's memory.

    Rows come from ``chunks`` (the holder's iterator, its own thread only): streamed straight into the index for a foreground
    thread build, otherwise appended to a snapshot file one chunk per ``advance()``.
    Once the rows are in hand the build starts in the background (or right there when
    ``background`` is False); ``ready`` turns true when ``take()`` can hand the new sampler over.
    """

    def __init__(self, make_sampler: Callable[[], ClassSampler], chunks: Iterator[tuple[int, np.ndarray]],
                 shape: tuple[int, int], started_step: int, *, background: bool = True,
                 workdir: str = "") -> None:
        self.started_step, self.background = started_step, background
        self.shape = shape
        self.sampler = make_sampler()
        self._chunks, self._rows_read = chunks, 0
        self._workdir_root = workdir
        self._workdir: Path | None = None
        self._snapshot: BinaryIO | None = None
        self._thread: threading.Thread | None = None
        self._result: ClassSampler | None = None
        self._error: BaseException | None = None
        self._child: subprocess.Popen | None = None
        self._cancelled = False
        self.bg_cpu_seconds = 0.0
        self.bg_wall_seconds = 0.0
        if background or self.sampler.build_in_subprocess:
            self._open_snapshot()

    def _make_workdir(self) -> Path:
        root = Path(self._workdir_root or tempfile.gettempdir())
        root.mkdir(parents=True, exist_ok=True)
        remove_stale_workdirs(root)
        self._workdir = Path(tempfile.mkdtemp(prefix=WORKDIR_PREFIX, dir=root))
        (self._workdir / OWNER_FILE).write_text(str(os.getpid()))
        return self._workdir

    def _open_snapshot(self) -> None:
        self._snapshot = open(self._make_workdir() / "snapshot.npy", "wb")
        write_npy_header(self._snapshot, self.shape)

    # -- training thread ----------------------------------------------------------------
    @property
    def snapshot_complete(self) -> bool:
        """True once the holder's thread has nothing more to read."""
        return self._snapshot is None or self._rows_read >= self.shape[0]

    @property
    def started(self) -> bool:
        return self._thread is not None or self._result is not None or self._error is not None

    @property
    def ready(self) -> bool:
        return self._result is not None or self._error is not None

    def advance(self, max_chunks: int = 1) -> None:
        """Append up to ``max_chunks`` more chunks to the snapshot file; start the build once it is complete."""
        if self._snapshot is not None:
            for _ in range(max_chunks):
                if self._rows_read >= self.shape[0]:
                    break
                _, rows = next(self._chunks)
                self._snapshot.write(np.ascontiguousarray(rows, dtype=np.float32).tobytes())
                self._rows_read += len(rows)
            if self._rows_read < self.shape[0]:
                return
            self._snapshot.close()
            self._snapshot = None
        if not self.started:
            if self.background:
                self._thread = threading.Thread(target=self._run, name="hfs-index-build", daemon=True)
                self._thread.start()
            else:
                self._run()

    def take(self) -> ClassSampler:
        """The built sampler."""
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
        if self._snapshot is not None and self._thread is None:
            self._snapshot.close()
            self._snapshot = None
            self._remove_workdir()

    # -- build (background thread, or inline) ---------------------------------------------
    def _set_child(self, proc: subprocess.Popen) -> None:
        self._child = proc
        if self._cancelled:
            proc.kill()

    def _remove_workdir(self) -> None:
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def _source_chunks(self) -> Iterator[tuple[int, np.ndarray]]:
        if self._workdir is not None:
            return read_npy_chunks(self._workdir / "snapshot.npy")
        return self._chunks  # a foreground build in the training thread: straight from the store

    def _run(self) -> None:
        wall0, cpu0 = time.perf_counter(), time.thread_time()
        sampler = self.sampler
        try:
            if sampler.build_in_subprocess:
                source = {"snapshot": str(self._workdir / "snapshot.npy")}
                self.bg_cpu_seconds += build_in_child(sampler, source, self.shape, self._workdir, self._set_child)
            else:
                sampler.rebuild(self._source_chunks(), *self.shape)
            if self._cancelled:
                sampler.close()
                return
            self._result = sampler
        except BaseException as exc:  # surfaced in the training thread by take()
            self._error = exc if not self._cancelled else None
        finally:
            # An annoy index is memory-mapped by now; its file can go (the mapping keeps
            # the data), so a process that dies without close() leaves nothing behind.
            self._remove_workdir()
            self.bg_cpu_seconds += time.thread_time() - cpu0
            self.bg_wall_seconds += time.perf_counter() - wall0
