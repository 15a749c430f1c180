"""The row kernels of the weight store: catch-up and SGD over a request's rows, chosen once.

Every sampled step reads its rows (catching up the steps they missed, docs/design/catchup.md)
and pushes their gradients (catch-up, then SGD). Two implementations do the same arithmetic:

- :class:`NumbaKernel` (``paramserver.kernel: numba``; the ``fast`` extra): one fused pass
  per row, compiled by numba (:mod:`hfs.paramserver.kernels_numba`). A push reads the row and
  its momentum once, catches them up, takes the SGD step and writes them back; a read
  computes the caught-up weights straight into its answer. Large requests spread their rows
  over numba's threads.
- :class:`NumpyKernel` (``numpy``): the vectorised fallback, a few numpy passes over the
  request (gather, suffix products of the distinct start ticks, 2x2 combination, write-back)
  in reused :class:`~hfs.paramserver.scratch.Scratch` arrays.

A read writes nothing back: a stale row's weights are computed for the answer and the row
catches up for good when it is next pushed, set, scanned or snapshotted, from the same tick
with the same product, so the numbers are those of a read that wrote back (and a sampled
get + push moves 8 row vectors instead of 10).

``auto`` (the default) takes numba when it imports and says once in the log when it falls
back. Both give the same float32 values: the same float64 suffix products, then the same
float32 operations in the same order.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from typing import TYPE_CHECKING, Callable, Protocol

import numpy as np

from hfs.paramserver.scratch import Scratch, take_rows
from hfs.utils.errors import HfsError
from hfs.utils.optional import install_hint

if TYPE_CHECKING:
    from hfs.paramserver.base import HParams
    from hfs.paramserver.catchup import RowClock

log = logging.getLogger(__name__)

#: values of ``paramserver.kernel``
KERNEL_CHOICES = ("auto", "numba", "numpy")
#: requests of at least this many elements (rows x dim) run on numba's threads, smaller ones in
#: the calling thread: 1,000 rows x 256 (~0.2 ms in one thread) gained nothing from two threads
#: of a busy 2-core box. NUMBA_NUM_THREADS=1 keeps every request in the calling thread.
PARALLEL_MIN_ELEMENTS = 1 << 18
#: rows per call of the numba range catch-up (a snapshot's: its per-row coefficients stay at 1 MiB)
RANGE_CHUNK_ROWS = 1 << 16
#: numba's threading layer unless NUMBA_THREADING_LAYER says otherwise: OpenMP's idle threads
#: spin after each kernel and took the cores from the numpy and torch work that followed
#: (2x slower on a 2-core box), and GNU OpenMP is not fork-safe (DataLoader workers fork); the
#: work queue neither spins nor minds a fork. It is not thread-safe, so every parallel launch
#: holds :attr:`NumbaKernel.lock`.
NUMBA_THREADING_LAYER = "workqueue"


class RowKernel(Protocol):
    """What the store and :class:`~hfs.paramserver.catchup.RowClock` ask of a kernel."""

    name: str

    def read(self, clock: "RowClock", weight: np.ndarray, momentum: np.ndarray, rows: np.ndarray,
             scratch: Scratch | None = None, out: np.ndarray | None = None,
             answer: Callable[[np.ndarray], None] | None = None) -> np.ndarray: ...

    def catch_up(self, clock: "RowClock", weight: np.ndarray, momentum: np.ndarray, rows: np.ndarray,
                 scratch: Scratch | None = None) -> int: ...

    def catch_up_range(self, clock: "RowClock", weight: np.ndarray, momentum: np.ndarray, start: int, stop: int,
                       scratch: Scratch | None = None) -> int: ...

    def sgd(self, weight: np.ndarray, momentum: np.ndarray, rows: np.ndarray, grads: np.ndarray, hp: "HParams",
            scratch: Scratch | None = None, clock: "RowClock | None" = None) -> None: ...

    def warm_up(self) -> float: ...


# --------------------------------------------------------------------------- numpy


def sgd_rows(weight: np.ndarray, momentum: np.ndarray, rows: np.ndarray | slice, grads: np.ndarray,
             hp: "HParams", work: Scratch | None = None) -> None:
    """Apply torch.optim.SGD's rule to unique ``rows`` of ``weight``/``momentum`` in place (numpy).

    One work array is reused for ``g`` and ``lr * buf`` (this is memory-bound); with ``work``
    (index rows only) the gathered rows and that array live in reused buffers.
    """
    if work is None or isinstance(rows, slice):
        w, buf = weight[rows], momentum[rows]
        scratch = np.empty_like(w)
    else:
        n, dim = grads.shape
        w = take_rows(weight, rows, work.get(0, n, dim))
        buf = take_rows(momentum, rows, work.get(1, n, dim))
        scratch = work.get(2, n, dim)
    if hp.weight_decay:
        np.multiply(w, np.float32(hp.weight_decay), out=scratch)
        scratch += grads  # g = grad + wd * w (addition commutes exactly)
        g = scratch
    else:
        g = grads
    buf *= np.float32(hp.momentum)
    buf += g
    np.multiply(buf, np.float32(hp.lr), out=scratch)
    w -= scratch
    weight[rows] = w
    momentum[rows] = buf


class NumpyKernel:
    """The vectorised numpy kernels: a few passes over the request in reused work arrays."""

    name = "numpy"

    def catch_up(self, clock: "RowClock", weight: np.ndarray, momentum: np.ndarray, rows: np.ndarray,
                 scratch: Scratch | None = None) -> int:
        """Bring ``rows`` (repeats harmless) to the clock's tick in place; returns how many moved.
        Rows already current cost one comparison each."""
        rows = clock.stale(rows)
        if rows.size:
            self._advance(clock, weight, momentum, rows, Scratch() if scratch is None else scratch)
        return int(rows.size)

    def read(self, clock: "RowClock", weight: np.ndarray, momentum: np.ndarray, rows: np.ndarray,
             scratch: Scratch | None = None, out: np.ndarray | None = None,
             answer: Callable[[np.ndarray], None] | None = None) -> np.ndarray:
        """See RowClock.read: the weights gathered into the answer, the stale ones' replaced by
        ``c00 * w + c01 * buf`` of their suffix product; the matrix is not written."""
        values = np.take(weight, rows, axis=0) if out is None else take_rows(weight, rows, out)
        behind = np.flatnonzero(clock.row_tick[rows] < clock.now)
        if behind.size:
            every = behind.size == rows.size
            stale = rows if every else rows[behind]
            coef = self._coefficients(clock, stale)
            w = values if every else values[behind]
            buf = take_rows(momentum, stale, (Scratch() if scratch is None else scratch).get(1, stale.size, w.shape[1]))
            w *= coef[:, 0, 0, None]
            buf *= coef[:, 0, 1, None]
            w += buf
            if not every:
                values[behind] = w
        if answer is not None:
            answer(values)
        return values

    @staticmethod
    def _coefficients(clock: "RowClock", rows: np.ndarray) -> np.ndarray:
        """Each row's suffix product from its tick, float64 products applied in float32 (the rows' own precision)."""
        starts, which = np.unique(clock.row_tick[rows], return_inverse=True)
        return clock.history.suffix_products(starts).astype(np.float32)[which]

    def _advance(self, clock: "RowClock", weight: np.ndarray, momentum: np.ndarray, rows: np.ndarray,
                 scratch: Scratch) -> None:
        """The catch-up of stale ``rows`` in place; work arrays in slots 0 to 3 of ``scratch``."""
        coef = self._coefficients(clock, rows)
        n, dim = rows.size, weight.shape[1]
        w = take_rows(weight, rows, scratch.get(0, n, dim))
        buf = take_rows(momentum, rows, scratch.get(1, n, dim))
        new_w = np.multiply(w, coef[:, 0, 0, None], out=scratch.get(2, n, dim))
        new_w += np.multiply(buf, coef[:, 0, 1, None], out=scratch.get(3, n, dim))
        buf *= coef[:, 1, 1, None]
        w *= coef[:, 1, 0, None]
        buf += w
        weight[rows] = new_w
        momentum[rows] = buf
        clock.row_tick[rows] = clock.now

    def catch_up_range(self, clock: "RowClock", weight: np.ndarray, momentum: np.ndarray, start: int, stop: int,
                       scratch: Scratch | None = None, chunk_rows: int = 8192) -> int:
        """Catch up the contiguous rows ``start..stop-1``, a bounded chunk at a time."""
        moved = 0
        for first in range(start, stop, chunk_rows):
            moved += self.catch_up(clock, weight, momentum,
                                   np.arange(first, min(first + chunk_rows, stop), dtype=np.int64), scratch)
        return moved

    def sgd(self, weight: np.ndarray, momentum: np.ndarray, rows: np.ndarray, grads: np.ndarray, hp: "HParams",
            scratch: Scratch | None = None, clock: "RowClock | None" = None) -> None:
        """SGD on unique ``rows``; with ``clock`` they first catch up to its tick."""
        if clock is not None:
            self.catch_up(clock, weight, momentum, rows, scratch)
        sgd_rows(weight, momentum, rows, grads, hp, scratch)

    def warm_up(self) -> float:
        return 0.0


# --------------------------------------------------------------------------- numba


class NumbaKernel:
    """The fused kernels of :mod:`hfs.paramserver.kernels_numba`: one pass per row.

    Rows must lie in ``[0, len(weight))`` (checked here, in one pass over the indices); a
    push's rows must be unique (the store sums repeats first). ``lock`` is held around every
    parallel launch (numba's work-queue layer takes one at a time per process).
    """

    name = "numba"

    def __init__(self, kernels: dict, lock: threading.Lock, threads: int) -> None:
        from hfs.paramserver.catchup import MAX_LEVELS

        self._kernels, self.lock, self.threads = kernels, lock, threads
        # stand-ins for a clock's tables under the lazy rule (no catch-up)
        self._no_ticks = np.zeros(0, dtype=np.int64)
        self._no_history = (np.zeros((0, 2, 2)), np.zeros(MAX_LEVELS, dtype=np.int64), np.zeros((0, 2, 2)))

    def _run(self, name: str, elements: int, *args):
        if elements >= PARALLEL_MIN_ELEMENTS and self.threads > 1:
            with self.lock:
                return self._kernels[f"{name}_parallel"](*args)
        return self._kernels[f"{name}_serial"](*args)

    def _checked(self, rows: np.ndarray, num_rows: int) -> np.ndarray:
        rows = np.ascontiguousarray(rows, dtype=np.int64)
        if not rows.flags.writeable:  # a message buffer: a copy of the indices saves compiling a variant
            rows = rows.copy()
        if rows.size and (rows.min() < 0 or rows.max() >= num_rows):  # the kernels do not check
            raise IndexError(f"row index out of range [0, {num_rows})")
        return rows

    def catch_up(self, clock: "RowClock", weight: np.ndarray, momentum: np.ndarray, rows: np.ndarray,
                 scratch: Scratch | None = None) -> int:
        """Bring ``rows`` (repeats harmless) to the clock's tick in place; returns how many were behind."""
        if clock.now == 0:
            return 0
        rows = self._checked(rows, weight.shape[0])
        return int(self._run("catch_up_rows", rows.size * weight.shape[1], weight, momentum, clock.row_tick, rows,
                             clock.now, *clock.history.tables()))

    def read(self, clock: "RowClock", weight: np.ndarray, momentum: np.ndarray, rows: np.ndarray,
             scratch: Scratch | None = None, out: np.ndarray | None = None,
             answer: Callable[[np.ndarray], None] | None = None) -> np.ndarray:
        """See RowClock.read: each row's weights read with its momentum, caught up into the answer
        in one pass; the matrix is not written."""
        rows = self._checked(rows, weight.shape[0])
        if out is None:
            out = np.empty((rows.size, weight.shape[1]), dtype=weight.dtype)
        self._run("read_rows", rows.size * weight.shape[1], weight, momentum, clock.row_tick, rows, clock.now,
                  *clock.history.tables(), out)
        if answer is not None:
            answer(out)
        return out

    def catch_up_range(self, clock: "RowClock", weight: np.ndarray, momentum: np.ndarray, start: int, stop: int,
                       scratch: Scratch | None = None) -> int:
        """Catch up the contiguous rows ``start..stop-1`` (no index array), a bounded chunk at a time."""
        if clock.now == 0 or stop <= start:
            return 0
        if not 0 <= start <= stop <= weight.shape[0]:
            raise IndexError(f"row range [{start}, {stop}) outside [0, {weight.shape[0]})")
        moved = 0
        for first in range(int(start), int(stop), RANGE_CHUNK_ROWS):  # bounds the kernel's n x 16-byte coefficients
            last = min(first + RANGE_CHUNK_ROWS, int(stop))
            moved += int(np.count_nonzero(clock.row_tick[first:last] < clock.now))
            self._run("catch_up_range", (last - first) * weight.shape[1], weight, momentum, clock.row_tick, first,
                      last, clock.now, *clock.history.tables())
        return moved

    def sgd(self, weight: np.ndarray, momentum: np.ndarray, rows: np.ndarray, grads: np.ndarray, hp: "HParams",
            scratch: Scratch | None = None, clock: "RowClock | None" = None) -> None:
        """SGD on unique ``rows``; with ``clock`` each first catches up to its tick, in the same pass."""
        rows = self._checked(rows, weight.shape[0])
        if clock is None:
            ticks, now, (blocks, offsets, recent) = self._no_ticks, 0, self._no_history
        else:
            ticks, now, (blocks, offsets, recent) = clock.row_tick, clock.now, clock.history.tables()
        self._run("sgd_rows", rows.size * weight.shape[1], weight, momentum, rows, np.ascontiguousarray(grads),
                  np.float32(hp.lr), np.float32(hp.momentum), np.float32(hp.weight_decay), ticks, now,
                  blocks, offsets, recent, clock is not None)

    def warm_up(self) -> float:
        """Compile (or load from numba's cache) every kernel for the store's array types, serial and
        parallel; returns the seconds it took (the first call's cost, paid here instead)."""
        from hfs.paramserver.base import HParams
        from hfs.paramserver.catchup import RowClock, zero_grad_transition

        t0 = time.perf_counter()
        clock = RowClock(4, self)
        weight, momentum = np.ones((4, 2), np.float32), np.zeros((4, 2), np.float32)
        hp = HParams(0.1, 0.9, 1e-3)
        grads = np.ones((2, 2), np.float32)
        frozen = grads.copy()
        frozen.flags.writeable = False  # the server's gradients are read-only message buffers
        clock.tick(np.array([0]), zero_grad_transition(hp.lr, hp.momentum, hp.weight_decay))
        rows = np.array([1, 2], dtype=np.int64)
        out = np.empty((2, 2), np.float32)
        lr, mu, wd = np.float32(hp.lr), np.float32(hp.momentum), np.float32(hp.weight_decay)
        with self.lock:
            for kind in ("serial", "parallel"):
                self._kernels[f"read_rows_{kind}"](weight, momentum, clock.row_tick, rows, clock.now,
                                                   *clock.history.tables(), out)
                self._kernels[f"catch_up_rows_{kind}"](weight, momentum, clock.row_tick, rows, clock.now,
                                                       *clock.history.tables())
                self._kernels[f"catch_up_range_{kind}"](weight, momentum, clock.row_tick, 0, 4, clock.now,
                                                        *clock.history.tables())
                for g in (grads, frozen):
                    self._kernels[f"sgd_rows_{kind}"](weight, momentum, rows, g, lr, mu, wd, clock.row_tick,
                                                      clock.now, *clock.history.tables(), True)
                    self._kernels[f"sgd_rows_{kind}"](weight, momentum, rows, g, lr, mu, wd, self._no_ticks, 0,
                                                      *self._no_history, False)
        return time.perf_counter() - t0


# --------------------------------------------------------------------------- choice


@functools.cache
def _numba_kernels() -> tuple[NumbaKernel | None, str]:
    """The process's numba kernels (None and why not when numba does not import). Built once:
    the compiled code and the lock of numba's threads are per process."""
    try:
        import numba
    except Exception as exc:  # noqa: BLE001 - ImportError, or a numba that refuses this numpy
        return None, f"{exc.__class__.__name__}: {exc}"
    if "NUMBA_THREADING_LAYER" not in os.environ:
        numba.config.THREADING_LAYER = NUMBA_THREADING_LAYER
    from hfs.paramserver import kernels_numba

    try:
        compiled = kernels_numba.compile_kernels(cache=True)
    except RuntimeError as exc:  # numba found no writable place for its cache
        log.warning("numba cannot cache the weight store's kernels (%s): they compile again in every process; "
                    "set NUMBA_CACHE_DIR to a writable folder", exc)
        compiled = kernels_numba.compile_kernels(cache=False)
    return NumbaKernel(compiled, threading.Lock(), int(numba.config.NUMBA_NUM_THREADS)), ""


@functools.cache
def _log_fallback(reason: str) -> None:
    """Once per process: the store runs the numpy path, and why."""
    log.info("the weight store's row kernels use the numpy fallback: numba is not available (%s); "
             "for the fused kernel: %s", reason, install_hint("numba", "fast"))


def load_kernel(name: str = "auto") -> RowKernel:
    """The kernel ``paramserver.kernel`` names: numba, numpy, or auto (numba when it imports)."""
    if name not in KERNEL_CHOICES:
        raise HfsError(f"paramserver.kernel must be one of {', '.join(KERNEL_CHOICES)}; got {name!r}")
    if name == "numpy":
        return NumpyKernel()
    kernel, reason = _numba_kernels()
    if kernel is not None:
        return kernel
    if name == "numba":
        raise HfsError(f"paramserver.kernel is 'numba' but numba is not available ({reason}): "
                       f"{install_hint('numba', 'fast')}, or set paramserver.kernel=auto")
    _log_fallback(reason)
    return NumpyKernel()
