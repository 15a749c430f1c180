"""The in-process weight store: named float32 matrices, their momentum, sparse SGD, snapshots.

It is the default store of `hfs train` (no server needed) and the engine inside every
`hfs serve-params` process. Memory is the weights and the momentum, C x D x 4 bytes each
(momentum is allocated zeroed, so the OS maps its pages only when rows are first updated);
nothing else grows with C. The arithmetic of every hot path runs in the store's row kernel
(``kernels.py``: one compiled pass per row with numba, else vectorised numpy).

Update rule, per touched row (``torch.optim.SGD`` with dampening 0 and nesterov off)::

    g   = grad + weight_decay * w
    buf = momentum * buf + g          # buf starts at 0, which equals torch's first-step clone
    w   = w - lr * buf

What happens to the rows a step does not touch is the matrix's ``update_rule``:

- ``catchup`` (default): what ``torch.optim.SGD`` does to the whole matrix, where an idle row
  still decays and coasts on its momentum every step, at sparse cost: each row remembers the
  step it is current at; a read computes its caught-up values in closed form from the steps
  it missed (`catchup.py`), and it catches up in place when it is next pushed, set, scanned
  or snapshotted. Equal to dense SGD to float32 round-off.
- ``lazy``: idle rows keep their weight *and* momentum; a row's stale momentum is replayed
  when it is next active (the rule of earlier versions; kept for comparison).
- ``dense``: every row is updated every step, O(C x D) per step: the reference, for tests
  and small matrices.

Every applied step is a step of the whole matrix, also when its pushes hold no rows (a shard
that owns none of the step's rows, or a step whose gradients overflowed under AMP and were
dropped): under catchup and dense the idle rows decay and coast on it. (Torch's GradScaler
skips the backbone's step entirely in the overflow case; the classifier's rows still take
this zero-gradient step, a difference of one step of decay in a rare event.)

Synchronous steps: the gradients every registered worker pushed for step t are summed
(duplicate rows add up) and applied once; ``get_rows(step=t+1)`` waits until step t is
applied. With no registered worker each push is applied at once (no waiting, no threads).
A step whose workers did not all arrive within ``timeout_s`` of its first push *fails*: its
gradients are discarded, the matrix stays as it was, every waiter and late pusher gets an
error naming the missing workers, and those workers are dropped from the registered set (so
a restarted job is not blocked by a dead one).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from hfs.paramserver.base import HParams, WeightStore
from hfs.paramserver.catchup import UPDATE_RULES, RowClock
from hfs.paramserver import snapshots as snaps
from hfs.paramserver.kernels import NumpyKernel, RowKernel, load_kernel, sgd_rows
from hfs.paramserver.scratch import Scratch, take_rows
from hfs.samplers.owned import IndexSpec, OwnedIndex
from hfs.samplers.base import normalise_rows
from hfs.samplers.selection import Selection, find_candidates, score_with_rows
from hfs.utils.errors import HfsError
from hfs.utils.typed import check_fields, rules

log = logging.getLogger(__name__)

INITS = ("gaussian", "uniform", "zeros")
#: Largest matrix a `create` may ask for (rows, dim); memory is checked separately.
MAX_ROWS = 1 << 40
MAX_DIM = 1 << 20
#: Most candidates a select may ask per query, and most (queries x candidates) per request.
MAX_SELECT_K = 1 << 16
MAX_SELECT_CANDIDATES = 1 << 24
#: Shortest spacing of the snapshot chunks ``tick`` appends between steps (a server's idle loop).
INDEX_TICK_S = 0.05
#: Rows per seeded block of the initialisation: block b draws from rng(seed, b), so the
#: values do not depend on how the matrix is split across shards.
INIT_BLOCK_ROWS = 16384
#: Failed steps remembered for late pushers.
_FAILED_KEEP = 64


class StoreError(HfsError):
    """A request the store refuses (unknown matrix, row out of range, wrong shape, ...)."""


@dataclass(frozen=True)
class MatrixSpec:
    """What ``create`` asks for, with the rules every caller (in process or over the wire) is held to."""

    rows: int = field(metadata=rules(gt=0, le=MAX_ROWS))
    dim: int = field(metadata=rules(gt=0, le=MAX_DIM))
    init: str = field(default="gaussian", metadata=rules(choices=INITS))
    std: float = field(default=0.01, metadata=rules(ge=0.0))
    seed: int = field(default=0, metadata=rules(ge=0))
    update_rule: str | None = field(default=None, metadata=rules(choices=UPDATE_RULES))


@dataclass(frozen=True)
class ShardSpec:
    """Which contiguous slice of every matrix's rows this store owns."""

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if not (isinstance(self.count, int) and self.count >= 1 and 0 <= self.index < self.count):
            raise StoreError(f"shard index {self.index} of {self.count} is not valid (need 0 <= index < count)")

    def bounds(self, num_rows: int) -> np.ndarray:
        """Row boundaries of all shards: shard i owns [bounds[i], bounds[i+1])."""
        return np.array([num_rows * i // self.count for i in range(self.count + 1)], dtype=np.int64)

    def row_range(self, num_rows: int) -> tuple[int, int]:
        b = self.bounds(num_rows)
        return int(b[self.index]), int(b[self.index + 1])


# --------------------------------------------------------------------------- maths


def sum_duplicate_rows(rows: np.ndarray, grads: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unique rows and the sum of their gradients, added in push order, without a loop over rows.

    Rows are stably sorted; each occurrence gets its rank within its row (0 for the first).
    Rank 0 is assigned at once, then rank r = 1, 2, ... is added with one fancy-indexed
    ``+=`` each (targets are distinct within a rank), so the Python loop runs over the
    largest multiplicity, not over rows. (``np.add.reduceat`` on 2-D gradients was ~15x
    slower; a row repeated more than 32 times falls back to ``np.add.at``.)
    """
    if rows.size <= 1:
        return rows, grads
    order = np.argsort(rows, kind="stable")
    sorted_rows = rows[order]
    is_first = np.empty(sorted_rows.size, dtype=bool)
    is_first[0] = True
    np.not_equal(sorted_rows[1:], sorted_rows[:-1], out=is_first[1:])
    if is_first.all():
        return rows, grads
    group = np.cumsum(is_first) - 1
    starts = np.flatnonzero(is_first)
    rank = np.arange(sorted_rows.size) - starts[group]
    max_rank = int(rank.max())
    if max_rank > 32:
        summed = np.zeros((starts.size, grads.shape[1]), dtype=grads.dtype)
        np.add.at(summed, group, grads[order])
        return sorted_rows[starts], summed
    summed = np.empty((starts.size, grads.shape[1]), dtype=grads.dtype)
    summed[group[is_first]] = grads[order[is_first]]
    for r in range(1, max_rank + 1):
        at = rank == r
        summed[group[at]] += grads[order[at]]
    return sorted_rows[starts], summed


def sgd_dense(weight: np.ndarray, momentum: np.ndarray, rows: np.ndarray, grads: np.ndarray,
              hp: HParams) -> None:
    """torch.optim.SGD on the whole matrix: ``rows`` get ``grads``, every other row a zero gradient."""
    full = np.zeros_like(weight)
    full[rows] = grads
    everything = slice(None)
    sgd_rows(weight, momentum, everything, full, hp)


def init_rows(out: np.ndarray, first_row: int, init: str, std: float, seed: int) -> None:
    """Fill ``out`` (rows first_row.. of a matrix) in place, one seeded block at a time.

    Block b of INIT_BLOCK_ROWS rows always draws from ``default_rng([seed, b])`` from its
    first row, so a shard starting mid-block gets the same values as an unsharded store.
    Peak extra memory is one block, never a second copy of the matrix.
    """
    if init == "zeros":
        out[...] = 0.0
        return
    end = first_row + out.shape[0]
    row = first_row
    while row < end:
        block_start = (row // INIT_BLOCK_ROWS) * INIT_BLOCK_ROWS
        stop = min(end, block_start + INIT_BLOCK_ROWS)
        skip = row - block_start
        target = out[row - first_row:stop - first_row]
        draw = np.empty((stop - block_start, out.shape[1]), dtype=np.float32) if skip else target
        rng = np.random.default_rng([seed, row // INIT_BLOCK_ROWS])
        if init == "gaussian":
            rng.standard_normal(dtype=np.float32, out=draw)
            draw *= np.float32(std)
        else:
            rng.random(dtype=np.float32, out=draw)
            draw *= np.float32(2.0 * std)
            draw -= np.float32(std)
        if skip:
            target[...] = draw[skip:]
        row = stop


# --------------------------------------------------------------------------- state


@dataclass
class PendingStep:
    """Gradients of one step while some registered workers have not pushed yet."""

    step: int
    deadline: float
    expected: set[str]
    pushed: set[str] = field(default_factory=set)
    rows: list[np.ndarray] = field(default_factory=list)
    grads: list[np.ndarray] = field(default_factory=list)

    def complete(self) -> bool:
        return self.expected <= self.pushed


@dataclass
class Matrix:
    """One named matrix (this shard's rows of it), its momentum, hparams and step book."""

    name: str
    num_rows: int
    row_start: int
    weight: np.ndarray
    momentum: np.ndarray
    hparams: HParams | None = None
    last_applied: int = -1
    update_rule: str = "catchup"
    pending: dict[int, PendingStep] = field(default_factory=dict)
    failed: dict[int, str] = field(default_factory=dict)
    clock: RowClock | None = None
    work: Scratch = field(default_factory=Scratch, repr=False)
    kernel: RowKernel = field(default_factory=NumpyKernel, repr=False)

    def __post_init__(self) -> None:
        if self.update_rule == "catchup" and self.clock is None:
            self.clock = RowClock(self.weight.shape[0], self.kernel)

    def catch_up(self, local_rows: np.ndarray) -> None:
        """Bring unique local rows to the last applied step (catchup rule; no-op otherwise)."""
        if self.clock is not None:
            self.clock.catch_up(self.weight, self.momentum, local_rows, self.work)

    def read(self, local_rows: np.ndarray, out: np.ndarray | None = None,
             answer: Callable[[np.ndarray], None] | None = None) -> np.ndarray:
        """The current values of local rows (a new array, or ``out``): under the catchup rule computed
        caught up, nothing written back (RowClock.read); ``answer`` gets them once they are known."""
        if self.clock is not None:
            return self.clock.read(self.weight, self.momentum, local_rows, self.work, out, answer)
        values = np.take(self.weight, local_rows, axis=0) if out is None else take_rows(self.weight, local_rows, out)
        if answer is not None:
            answer(values)
        return values

    def apply_sgd(self, unique: np.ndarray, summed: np.ndarray) -> None:
        """One SGD step with the gradients of ``unique`` rows (catchup: caught up in the same pass,
        the step recorded; lazy: the rows alone)."""
        if self.clock is not None:
            self.clock.step(self.weight, self.momentum, unique, summed, self.hparams, self.work)
        else:
            self.kernel.sgd(self.weight, self.momentum, unique, summed, self.hparams, self.work)

    def catch_up_range(self, start: int, stop: int) -> None:
        if self.clock is not None:
            self.clock.catch_up_range(self.weight, self.momentum, start, stop, self.work)

    def catch_up_all(self) -> None:
        """Every row current, and the step history forgotten (before a snapshot or a rule change)."""
        if self.clock is not None:
            self.catch_up_range(0, self.weight.shape[0])
            self.clock.forget_history()

    def set_update_rule(self, rule: str) -> None:
        if rule != self.update_rule:
            self.catch_up_all()
            self.update_rule = rule
            self.clock = RowClock(self.weight.shape[0], self.kernel) if rule == "catchup" else None

    def info(self) -> dict:
        return {"rows": self.num_rows, "dim": self.dim, "row_start": self.row_start, "row_end": self.row_end,
                "last_applied": self.last_applied, "update_rule": self.update_rule,
                "hparams": None if self.hparams is None else vars(self.hparams)}

    @property
    def dim(self) -> int:
        return int(self.weight.shape[1])

    @property
    def row_end(self) -> int:
        return self.row_start + int(self.weight.shape[0])


def lazy_zeros(shape: tuple[int, int]) -> np.ndarray:
    """A zeroed float32 array whose 4 KiB pages the OS maps only when first written.

    ``np.zeros`` asks the kernel for 2 MiB transparent huge pages on large arrays, so one
    sparse update of a random row mapped (and zeroed) 2 MiB: 1000 random rows of a
    10M x 128 momentum faulted in ~2 GB per step until the whole matrix was resident
    (a 10M-class step took 0.75 s instead of 12 ms). An anonymous mmap advised against huge
    pages keeps the momentum lazy, as this module promises.
    """
    import mmap

    count = int(np.prod(shape))
    buf = mmap.mmap(-1, max(count * 4, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_NOHUGEPAGE"):
        buf.madvise(mmap.MADV_NOHUGEPAGE)
    return np.frombuffer(buf, dtype=np.float32, count=count).reshape(shape)


def _available_memory_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _check_rule(rule: str) -> str:
    if rule not in UPDATE_RULES:
        raise StoreError(f"update_rule must be one of {', '.join(UPDATE_RULES)}; got {rule!r}")
    return rule


def _as_rows(rows: object, what: str = "rows") -> np.ndarray:
    arr = np.asarray(rows)
    if arr.ndim != 1 or arr.dtype.kind not in "iu":
        raise StoreError(f"{what} must be a 1-D integer array, got {arr.dtype}{list(arr.shape)}")
    return arr.astype(np.int64, copy=False)


# --------------------------------------------------------------------------- the store


class InProcessStore(WeightStore):
    """Matrices in this process's RAM; thread-safe; the engine of the server too.

    ``timeout_s`` bounds a synchronous step; ``snapshot_dir`` (optional) enables snapshots,
    of which the newest ``keep_snapshots`` automatic ones are kept; ``snapshot_every_steps``
    / ``snapshot_every_s`` (0 = off) take automatic snapshots after applied steps;
    ``update_rule`` is the rule of matrices created without one (see the module docstring);
    ``kernel`` (auto | numba | numpy) the row kernels of the catch-up and SGD
    (:mod:`hfs.paramserver.kernels`).
    """

    def __init__(self, snapshot_dir: str | Path | None = None, *, keep_snapshots: int = 3,
                 timeout_s: float = 60.0, snapshot_every_steps: int = 0, snapshot_every_s: float = 0.0,
                 shard: ShardSpec = ShardSpec(), update_rule: str = "catchup",
                 index_workdir: str | Path | None = None, kernel: str = "auto") -> None:
        self.update_rule = _check_rule(update_rule)
        self.kernel = load_kernel(kernel)
        # where index builds put their files; set (a server), it replaces every spec's workdir
        self.index_workdir = str(index_workdir) if index_workdir is not None else None
        self._indexes: dict[str, OwnedIndex] = {}
        self._last_index_tick = 0.0
        self.snapshot_dir = Path(snapshot_dir) if snapshot_dir else None
        self.keep_snapshots = keep_snapshots
        self.timeout_s = timeout_s
        self.snapshot_every_steps = snapshot_every_steps
        self.snapshot_every_s = snapshot_every_s
        self.shard = shard
        self._matrices: dict[str, Matrix] = {}
        self._workers: set[str] = set()
        self._cond = threading.Condition(threading.RLock())
        self._counters = {"pushes": 0, "rows_pushed": 0, "steps_applied": 0, "rows_applied": 0,
                          "gets": 0, "rows_read": 0, "sets": 0, "snapshots": 0, "failed_steps": 0,
                          "selects": 0, "index_attaches": 0, "index_failures": 0}
        self._last_snapshot_step = 0
        self._last_snapshot_time = time.monotonic()
        self._dirty = False
        if self.snapshot_dir is not None:
            for name in snaps.remove_stale_temps(self.snapshot_dir):
                log.info("removed half-written snapshot folder %s", name)

    # -- helpers ---------------------------------------------------------------------
    def _matrix(self, name: str) -> Matrix:
        try:
            return self._matrices[name]
        except KeyError:
            known = ", ".join(sorted(self._matrices)) or "none"
            raise StoreError(f"no matrix named {name!r} (known: {known})") from None

    def _local_rows(self, m: Matrix, rows: object) -> np.ndarray:
        arr = _as_rows(rows)
        if arr.size:
            lo, hi = int(arr.min()), int(arr.max())
            if lo < m.row_start or hi >= m.row_end:
                bad = lo if lo < m.row_start else hi
                raise StoreError(f"row {bad} out of range [{m.row_start}, {m.row_end}) of matrix {m.name!r}")
        return arr - m.row_start if m.row_start else arr

    def _values(self, m: Matrix, values: object, n: int, what: str) -> np.ndarray:
        arr = np.asarray(values)
        if arr.dtype != np.float32:
            raise StoreError(f"{what} for matrix {m.name!r} must be float32, got {arr.dtype}")
        if arr.shape != (n, m.dim):
            raise StoreError(f"{what} for matrix {m.name!r} must have shape ({n}, {m.dim}), got {tuple(arr.shape)}")
        if not np.isfinite(arr).all():
            raise StoreError(f"{what} for matrix {m.name!r} contain NaN or infinity")
        return arr

    def _resolve_worker(self, worker: str | None) -> str | None:
        if worker is None:
            if len(self._workers) > 1:
                raise StoreError(f"push without a worker name while {len(self._workers)} workers are registered")
            return next(iter(self._workers), None)
        if self._workers and worker not in self._workers:
            raise StoreError(f"worker {worker!r} is not registered (registered: {', '.join(sorted(self._workers))})")
        return worker

    @property
    def step(self) -> int:
        """The next step to run: one past the highest applied step of any matrix."""
        return max((m.last_applied for m in self._matrices.values()), default=-1) + 1

    # -- workers ---------------------------------------------------------------------
    def register(self, worker: str) -> None:
        with self._cond:
            self._workers.add(str(worker))
            log.info("worker %s registered (%d now)", worker, len(self._workers))

    def leave(self, worker: str) -> None:
        with self._cond:
            self._workers.discard(worker)
            for m in self._matrices.values():
                for p in m.pending.values():
                    p.expected.discard(worker)
                self._apply_due(m)
            self._cond.notify_all()
            log.info("worker %s left (%d remain)", worker, len(self._workers))

    def workers(self) -> list[str]:
        with self._cond:
            return sorted(self._workers)

    # -- matrices --------------------------------------------------------------------
    def create(self, name: str, num_rows: int, dim: int, *, init: str = "gaussian", std: float = 0.01,
               seed: int = 0, exist_ok: bool = False, update_rule: str | None = None) -> None:
        """See WeightStore.create. An existing matrix kept by ``exist_ok`` switches to ``update_rule``
        when one is given (its rows first caught up under the old rule)."""
        snaps.check_plain_name(name, "matrix name")
        spec = check_fields(MatrixSpec(num_rows, dim, init, std, seed, update_rule), f"matrix {name!r}",
                            error=StoreError, finite=True)
        num_rows, dim, rule = spec.rows, spec.dim, spec.update_rule or self.update_rule
        with self._cond:
            if name in self._matrices:
                have = self._matrices[name]
                if exist_ok and (have.num_rows, have.dim) == (num_rows, dim):
                    if update_rule is not None and have.update_rule != rule:
                        log.info("matrix %s: update rule %s -> %s", name, have.update_rule, rule)
                        have.set_update_rule(rule)
                    return
                raise StoreError(f"matrix {name!r} already exists with shape ({have.num_rows}, {have.dim})")
            start, end = self.shard.row_range(num_rows)
            need = (end - start) * dim * 4 * 2
            avail = _available_memory_bytes()
            if avail is not None and need > avail:
                raise StoreError(f"matrix {name!r} needs {need / 2**30:.1f} GiB (weights + momentum) "
                                 f"but only {avail / 2**30:.1f} GiB is available")
            try:
                weight = np.empty((end - start, dim), dtype=np.float32)
                momentum = lazy_zeros((end - start, dim))
            except MemoryError:
                raise StoreError(f"not enough memory for matrix {name!r} ({need / 2**30:.1f} GiB)") from None
            init_rows(weight, start, spec.init, spec.std, spec.seed)
            self._matrices[name] = Matrix(name, num_rows, start, weight, momentum, update_rule=rule,
                                          kernel=self.kernel)
            self._dirty = True
            log.info("created matrix %s: rows %d..%d of %d, dim %d (%s, update rule %s)", name, start, end,
                     num_rows, dim, init, rule)

    def shape(self, name: str) -> tuple[int, int]:
        with self._cond:
            m = self._matrix(name)
            return m.num_rows, m.dim

    def last_applied(self, name: str) -> int:
        with self._cond:
            return self._matrix(name).last_applied

    def matrices(self) -> dict[str, dict]:
        """Per matrix: total rows, dim, this store's row range, last applied step."""
        with self._cond:
            return {m.name: m.info() for m in self._matrices.values()}

    def try_get_rows(self, name: str, rows: np.ndarray, step: int | None = None, *,
                     out: np.ndarray | None = None,
                     answer: Callable[[np.ndarray], None] | None = None) -> np.ndarray | None:
        """Rows' values, or None while a step before ``step`` is still pending (never blocks).
        ``out``: a float32 (n, dim) C-order array to write them into (the server's reply buffer).
        ``answer``: called with the values, under the store's lock, as soon as they are known (the
        server sends its reply there; see RowClock.read). A read writes nothing back, so nothing
        after ``answer`` uses ``rows``: once the reply is out, a same-host client may already be
        writing its next request over the buffer they came in."""
        with self._cond:
            m = self._matrix(name)
            local = self._local_rows(m, rows)
            if step is not None and not self._ready(m, int(step)):
                return None
            if out is not None and (out.shape != (local.size, m.dim) or out.dtype != np.float32
                                    or not out.flags.c_contiguous):
                raise StoreError(f"out must be float32 ({local.size}, {m.dim}) in C order, got "
                                 f"{out.dtype}{list(out.shape)}")
            self._counters["gets"] += 1
            self._counters["rows_read"] += local.size
            return m.read(local, out, answer)

    def try_get_range(self, name: str, start: int, stop: int, step: int | None = None) -> np.ndarray | None:
        """Rows start..stop-1 (a copy), or None while a step before ``step`` is pending."""
        with self._cond:
            m = self._matrix(name)
            if not (m.row_start <= start <= stop <= m.row_end):
                raise StoreError(f"range [{start}, {stop}) is outside rows [{m.row_start}, {m.row_end}) "
                                 f"of matrix {name!r}")
            if step is not None and not self._ready(m, int(step)):
                return None
            self._counters["gets"] += 1
            self._counters["rows_read"] += stop - start
            m.catch_up_range(start - m.row_start, stop - m.row_start)
            return m.weight[start - m.row_start:stop - m.row_start].copy()

    def get_rows(self, name: str, rows: np.ndarray, step: int | None = None) -> np.ndarray:
        with self._cond:
            while True:
                out = self.try_get_rows(name, rows, step)
                if out is not None:
                    return out
                self._wait_for_steps()

    def _wait_for_steps(self) -> None:
        """Block (lock released) until something changes or the earliest step deadline passes."""
        deadline = self.next_deadline()
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic()) + 1e-3
        self._cond.wait(timeout)
        self.expire()

    def _ready(self, m: Matrix, step: int) -> bool:
        """True when no step before ``step`` is pending; raises if one of them failed."""
        for failed_step, message in m.failed.items():
            if m.last_applied < failed_step < step:
                raise StoreError(message)
        return not any(s < step for s in m.pending)

    def set_rows(self, name: str, rows: np.ndarray, values: np.ndarray) -> None:
        with self._cond:
            m = self._matrix(name)
            local = self._local_rows(m, rows)
            values = self._values(m, values, local.size, "values")
            m.catch_up(local)  # the momentum moves on from the current step
            m.weight[local] = values
            self._counters["sets"] += 1
            self._dirty = True
            changed = np.unique(local)
            if name in self._indexes and changed.size:  # the index sees every change, as after a step
                self._index_upkeep(name, lambda index: index.rows_changed(changed, lambda rows: m.weight[rows]))

    def push_grads(self, name: str, rows: np.ndarray, grads: np.ndarray, step: int, *,
                   worker: str | None = None, copy: bool = True) -> None:
        """See WeightStore.push_grads. ``copy=False``: the caller will not modify ``rows``/``grads``
        before the step is applied (the server passes read-only message buffers), so a pending
        step keeps them without a copy."""
        with self._cond:
            m = self._matrix(name)
            local = self._local_rows(m, rows)
            grads = self._values(m, grads, local.size, "grads")
            step = int(step)
            worker = self._resolve_worker(worker)
            if step in m.failed:
                raise StoreError(m.failed[step])
            if step <= m.last_applied:
                raise StoreError(f"step {step} of matrix {name!r} is already applied (last applied: {m.last_applied})")
            if m.hparams is None:
                raise StoreError(f"matrix {name!r} has no learning rate yet: call set_hparams before pushing")
            self._counters["pushes"] += 1
            self._counters["rows_pushed"] += local.size
            pending = m.pending.get(step)
            if pending is None and not self._workers:
                self._apply(m, step, [local], [grads])
                return
            if pending is None:
                pending = m.pending[step] = PendingStep(step, time.monotonic() + self.timeout_s, set(self._workers))
            if worker in pending.pushed:
                raise StoreError(f"worker {worker!r} already pushed step {step} of matrix {name!r}")
            pending.pushed.add(worker)
            pending.rows.append(local.copy() if copy and local is rows else local)
            pending.grads.append(np.array(grads, copy=True) if copy else grads)
            if self._apply_due(m):
                self._cond.notify_all()

    def _apply_due(self, m: Matrix) -> bool:
        """Apply complete pending steps in step order; True if any was applied."""
        applied = False
        while m.pending:
            first = min(m.pending)
            pending = m.pending[first]
            if not pending.complete():
                break
            del m.pending[first]
            self._apply(m, first, pending.rows, pending.grads)
            applied = True
        return applied

    def _apply(self, m: Matrix, step: int, rows: list[np.ndarray], grads: list[np.ndarray]) -> None:
        all_rows = rows[0] if len(rows) == 1 else np.concatenate(rows)
        all_grads = grads[0] if len(grads) == 1 else np.concatenate(grads)
        unique, summed = sum_duplicate_rows(all_rows, all_grads)
        self._apply_rule(m, unique, summed)
        self._index_after_step(m, unique, step)
        self._counters["rows_applied"] += unique.size
        m.last_applied = step
        self._counters["steps_applied"] += 1
        self._dirty = True
        self._maybe_periodic_snapshot()

    @staticmethod
    def _apply_rule(m: Matrix, unique: np.ndarray, summed: np.ndarray) -> None:
        """One SGD step with the gradients of ``unique`` rows, under the matrix's update rule."""
        if m.update_rule == "dense":
            sgd_dense(m.weight, m.momentum, unique, summed, m.hparams)
        elif unique.size or m.update_rule == "catchup":  # an empty step still ticks the catchup clock
            m.apply_sgd(unique, summed)

    def set_hparams(self, name: str, hparams: HParams) -> None:
        if not isinstance(hparams, HParams):
            raise StoreError(f"hparams must be HParams, got {type(hparams).__name__}")
        hparams = check_fields(hparams, "hparams", error=StoreError, finite=True)  # plain floats, each >= 0
        with self._cond:
            self._matrix(name).hparams = hparams

    def iter_chunks(self, name: str, chunk_rows: int = 65536) -> Iterator[tuple[int, np.ndarray]]:
        with self._cond:
            m = self._matrix(name)
            start, end = m.row_start, m.row_end
        for first in range(start, end, max(1, int(chunk_rows))):
            chunk = self.try_get_range(name, first, min(first + chunk_rows, end))
            yield first, chunk

    # -- synchronous-step deadlines ----------------------------------------------------
    def next_deadline(self) -> float | None:
        with self._cond:
            deadlines = [p.deadline for m in self._matrices.values() for p in m.pending.values()]
            return min(deadlines, default=None)

    def expire(self, now: float | None = None) -> list[str]:
        """Fail the pending steps whose deadline passed; return their error messages."""
        now = time.monotonic() if now is None else now
        messages = []
        with self._cond:
            for m in self._matrices.values():
                for step in sorted(s for s, p in m.pending.items() if p.deadline <= now):
                    pending = m.pending.pop(step)
                    missing = sorted(pending.expected - pending.pushed)
                    message = (f"step {step} of matrix {m.name!r} failed: worker(s) {', '.join(missing)} did not "
                               f"push within {self.timeout_s:g} s (pushed: {', '.join(sorted(pending.pushed)) or 'none'}); "
                               "its gradients were discarded and the missing workers unregistered")
                    m.failed[step] = message
                    while len(m.failed) > _FAILED_KEEP:
                        del m.failed[min(m.failed)]
                    self._workers.difference_update(missing)
                    self._counters["failed_steps"] += 1
                    log.error(message)
                    messages.append(message)
                self._apply_due(m)
            if messages:
                self._cond.notify_all()
        return messages

    # -- persistence -----------------------------------------------------------------
    def _require_snapshot_dir(self) -> Path:
        if self.snapshot_dir is None:
            raise StoreError("this store has no snapshot folder (set paramserver.snapshot_dir or --snapshot-dir)")
        return self.snapshot_dir

    def snapshot(self, tag: str | None = None) -> str:
        directory = self._require_snapshot_dir()
        with self._cond:
            step = self.step
            name = snaps.check_plain_name(tag) if tag else snaps.auto_name(step)
            for m in self._matrices.values():
                m.catch_up_all()  # a snapshot holds every row as dense SGD has it now
            meta = {"step": step, "shard": {"index": self.shard.index, "count": self.shard.count},
                    "matrices": {m.name: m.info() for m in self._matrices.values()}}
            arrays = {}
            for m in self._matrices.values():
                arrays[f"{m.name}.weight"] = m.weight
                arrays[f"{m.name}.momentum"] = m.momentum
            t0 = time.monotonic()
            snaps.write_snapshot(directory, name, meta, arrays)
            self._counters["snapshots"] += 1
            self._last_snapshot_step = step
            self._last_snapshot_time = time.monotonic()
            self._dirty = False
        removed = snaps.prune_snapshots(directory, self.keep_snapshots)
        log.info("snapshot %s (step %d) written in %.2f s%s", name, step, time.monotonic() - t0,
                 f"; removed {', '.join(removed)}" if removed else "")
        return name

    def restore(self, tag: str = "latest") -> int:
        directory = self._require_snapshot_dir()
        folder = snaps.resolve_snapshot(directory, tag)
        manifest = snaps.read_manifest(folder)
        try:
            shard = manifest["shard"]
            if (shard["index"], shard["count"]) != (self.shard.index, self.shard.count):
                raise StoreError(f"snapshot {folder} belongs to shard {shard['index']} of {shard['count']}, "
                                 f"this store is shard {self.shard.index} of {self.shard.count}")
            step = int(manifest["step"])
            loaded = self._load_matrices(folder, manifest, self.kernel)
            learnt = {name: (info["sampler"], {key: snaps.load_array(folder, manifest["files"][f"{name}.index.{key}"])
                                               for key in info["arrays"]})
                      for name, info in manifest.get("indexes", {}).items()}
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise snaps.SnapshotError(f"snapshot manifest {folder / snaps.MANIFEST} is malformed "
                                      f"({exc.__class__.__name__}: {exc})") from None
        with self._cond:
            self._matrices = loaded
            self._last_snapshot_step = step
            self._last_snapshot_time = time.monotonic()
            self._dirty = False
            self._rebuild_indexes()
            self._cond.notify_all()
        log.info("restored snapshot %s (step %d, %d matrices)", folder.name, step, len(loaded))
        return step

    @staticmethod
    def _load_matrices(folder: Path, manifest: dict, kernel: RowKernel) -> dict[str, Matrix]:
        files = manifest["files"]
        loaded: dict[str, Matrix] = {}
        for name, info in manifest["matrices"].items():
            weight = snaps.load_array(folder, files[f"{name}.weight"])
            momentum = snaps.load_array(folder, files[f"{name}.momentum"])
            if weight.shape != momentum.shape or weight.dtype != np.float32 or weight.ndim != 2:
                raise StoreError(f"snapshot {folder}: matrix {name!r} has inconsistent arrays")
            hp = info.get("hparams")
            # snapshots before update rules existed were written by the lazy rule
            rule = _check_rule(info.get("update_rule", "lazy"))
            loaded[name] = Matrix(name, int(info["rows"]), int(info["row_start"]), weight, momentum,
                                  HParams(**hp) if hp else None, int(info.get("last_applied", -1)), rule,
                                  kernel=kernel)
        return loaded

    def _maybe_periodic_snapshot(self) -> None:
        if self.snapshot_dir is None or not self._dirty:
            return
        due_steps = self.snapshot_every_steps and self.step - self._last_snapshot_step >= self.snapshot_every_steps
        due_time = self.snapshot_every_s and time.monotonic() - self._last_snapshot_time >= self.snapshot_every_s
        if due_steps or due_time:
            try:
                self.snapshot()
            except (HfsError, OSError) as exc:
                # The step that triggered it is applied; a failed periodic snapshot must not
                # fail that push or kill the server. Retry at the next due point.
                log.error("periodic snapshot failed: %s", exc)
                self._last_snapshot_step, self._last_snapshot_time = self.step, time.monotonic()

    def tick(self) -> None:
        """Housekeeping a server calls between messages: fail overdue steps, timed snapshots, and
        index builds in flight (one snapshot chunk per ``INDEX_TICK_S``, a finished build swapped in)."""
        self.expire()
        with self._cond:
            self._maybe_periodic_snapshot()
            now = time.monotonic()
            if self._indexes and now - self._last_index_tick >= INDEX_TICK_S:
                self._last_index_tick = now
                for name in list(self._indexes):
                    self._index_upkeep(name, lambda index: index.advance())

    def stats(self) -> dict:
        with self._cond:
            return {"step": self.step, "workers": sorted(self._workers), "matrices": self.matrices(),
                    "kernel": self.kernel.name,
                    "indexes": {name: index.upkeep() for name, index in self._indexes.items()},
                    "bytes_held": int(sum(m.weight.nbytes + m.momentum.nbytes for m in self._matrices.values())),
                    "pending_steps": sum(len(m.pending) for m in self._matrices.values()),
                    **self._counters}

    def close(self) -> None:
        """Stop index builds in flight and release the indexes. Idempotent."""
        with self._cond:
            indexes, self._indexes = self._indexes, {}
        for index in indexes.values():
            index.close()

    # -- the index over each matrix's rows ----------------------------------------------
    def attach_index(self, name: str, spec: IndexSpec) -> bool:
        """See WeightStore.attach_index: this store indexes its own rows (ids local to the shard,
        answered as global ids). A server replaces the spec's ``workdir`` with its own."""
        if not isinstance(spec, IndexSpec):
            raise StoreError(f"index spec must be an IndexSpec, got {type(spec).__name__}")
        if self.index_workdir is not None:
            spec = dataclasses.replace(spec, workdir=self.index_workdir)
        with self._cond:
            self._matrix(name)
            have = self._indexes.get(name)
            if have is not None and have.spec == spec:
                return False
            if have is not None:
                log.info("matrix %s: index spec changed; replacing its %s index", name, have.spec.sampler)
                have.close()
            self._counters["index_attaches"] += 1
            self._indexes[name] = self._new_index(name, spec)
            return True

    def _new_index(self, name: str, spec: IndexSpec) -> OwnedIndex:
        m = self._matrix(name)
        # the first snapshot chunk by chunk too (per applied step, per tick): a server answering
        # `index` must not stall its loop for a C x D x 4-byte write
        index = OwnedIndex(spec, m.weight.shape, lambda: self._local_chunks(name, spec.chunk_rows),
                           snapshot_at_once=False)
        if index.uses_index:
            log.info("matrix %s: building a %s index over rows %d..%d%s", name, spec.sampler, m.row_start, m.row_end,
                     " in the background; uniform negatives until it is ready" if not index.ready else "")
        return index

    def _rebuild_indexes(self) -> None:
        """After a restore: the index is not saved, so each is built again from the restored rows."""
        for name, index in list(self._indexes.items()):
            index.close()
            del self._indexes[name]
            if name in self._matrices:
                log.info("matrix %s: indexes are not saved; rebuilding it from the restored rows", name)
                self._indexes[name] = self._new_index(name, index.spec)

    def _local_chunks(self, name: str, chunk_rows: int) -> Iterator[tuple[int, np.ndarray]]:
        """(first local row, rows) copies of this store's rows of ``name``, each caught up to the last step."""
        chunk_rows = max(1, int(chunk_rows))
        first = 0
        while True:
            with self._cond:
                m = self._matrix(name)
                if first >= m.weight.shape[0]:
                    return
                stop = min(first + chunk_rows, m.weight.shape[0])
                m.catch_up_range(first, stop)
                chunk = m.weight[first:stop].copy()
            yield first, chunk
            first = stop

    def _index_after_step(self, m: Matrix, unique: np.ndarray, step: int) -> None:
        """Drift where the update is applied: the index sees the rows it just changed, then its refresh."""
        if m.name not in self._indexes:
            return

        def upkeep(index: OwnedIndex) -> None:
            if index.ready and unique.size:
                index.rows_changed(unique, lambda rows: m.weight[rows])  # reads only the rows it measures
            index.maybe_refresh(step)

        self._index_upkeep(m.name, upkeep)

    def _index_upkeep(self, name: str, work) -> None:
        """Run ``work(index)``; an index that fails is dropped (selection falls back to uniform
        negatives) instead of failing the step that was just applied."""
        index = self._indexes.get(name)
        if index is None:
            return
        try:
            work(index)
        except Exception as exc:  # noqa: BLE001 - the store must go on serving rows
            self._counters["index_failures"] += 1
            log.error("matrix %s: dropping its %s index (%s); uniform negatives from now on", name,
                      index.spec.sampler, exc)
            index.close()
            self._indexes.pop(name, None)

    def index_stats(self, name: str) -> dict:
        with self._cond:
            self._matrix(name)
            index = self._indexes.get(name)
            return index.upkeep() if index is not None else {}

    def _select_inputs(self, m: Matrix, features: object, k: object) -> tuple[np.ndarray, int]:
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

    def try_search(self, name: str, features: np.ndarray, k: int, step: int | None = None, *,
                   fresh: bool = False) -> tuple[np.ndarray, np.ndarray] | None:
        """(B, k') global ids and similarities of this store's best rows per query (k' = 0 while no
        index is ready), or None while a step before ``step`` is pending; ``fresh``: similarities
        under the current rows (see ``OwnedIndex.answer``)."""
        with self._cond:
            m = self._matrix(name)
            features, k = self._select_inputs(m, features, k)
            if step is not None and not self._ready(m, int(step)):
                return None
            self._counters["selects"] += 1
            return self._search(m, features, k, fresh=fresh)

    def _search(self, m: Matrix, features: np.ndarray, k: int, *, fresh: bool) -> tuple[np.ndarray, np.ndarray]:
        """The matrix's index answer for ``features`` (global ids), or (B, 0) without a ready index."""
        index = self._indexes.get(m.name)
        if index is None or not index.ready or k == 0:
            return np.empty((len(features), 0), dtype=np.int64), np.empty((len(features), 0), dtype=np.float32)
        scorer = self._scorer(m, features, index.metric)
        ids, sims = index.answer(features, k, lambda local: scorer(self._global(m, local)), fresh=fresh)
        return self._global(m, ids), sims

    def try_select(self, name: str, features: np.ndarray, labels: np.ndarray, step: int, rule, k: int, *,
                   with_rows: bool = True, answer: Callable[[Selection, np.ndarray], None] | None = None
                   ) -> tuple[Selection, np.ndarray | None] | None:
        """``select`` without blocking: None while a step before ``step`` is pending. ``answer``
        (with rows): called with the selection and the rows' values as soon as they are known, as
        in :meth:`try_get_rows`."""
        with self._cond:
            m = self._matrix(name)
            labels = _as_rows(labels, "labels")
            if labels.shape[0] != np.shape(features)[0]:
                raise StoreError(f"{labels.shape[0]} labels for {np.shape(features)[0]} feature rows")
            if labels.size and (labels.min() < -1 or labels.max() >= m.num_rows):
                raise StoreError(f"labels must be in [0, {m.num_rows}) (or -1: no positive), got "
                                 f"{labels.min()}..{labels.max()}")
            if with_rows and (m.row_start, m.row_end) != (0, m.num_rows):
                raise StoreError(f"select with rows needs the whole matrix {m.name!r}; this shard holds rows "
                                 f"{m.row_start}..{m.row_end}: ask every shard for candidates and merge them")
            features, k = self._select_inputs(m, features, k)
            if not self._ready(m, int(step)):
                return None
            self._counters["selects"] += 1
            index = self._indexes.get(name)
            metric = index.metric if index is not None else "cosine"

            def search(asking: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
                return self._search(m, asking, k, fresh=rule.needs_scorer)

            try:
                scorer = self._scorer(m, features, metric)
                ids, sims, measured = find_candidates(rule, labels, features, m.num_rows, int(step), search, scorer)
                chosen = rule.select(labels, ids, sims, m.num_rows, int(step), scorer=scorer, measured=measured)
            except ValueError as exc:
                raise StoreError(f"select on matrix {m.name!r}: {exc}") from None
            if not with_rows:
                return chosen, None
            local = chosen.active - m.row_start if m.row_start else chosen.active
            self._counters["rows_read"] += local.size
            return chosen, m.read(local, answer=None if answer is None else lambda values: answer(chosen, values))

    @staticmethod
    def _global(m: Matrix, local: np.ndarray) -> np.ndarray:
        local = np.asarray(local, dtype=np.int64)
        return np.where(local >= 0, local + m.row_start, -1)

    def _scorer(self, m: Matrix, features: np.ndarray, metric: str) -> Callable[[np.ndarray], np.ndarray]:
        """The selection rule's :data:`~hfs.samplers.selection.Scorer` over this store's current rows of ``m``
        (caught up as a read would), for whole-matrix stores; a shard's rows answer their own ids only."""
        queries = normalise_rows(features) if metric == "cosine" else np.asarray(features, dtype=np.float32)

        def rows_of(ids: np.ndarray) -> np.ndarray:
            values = m.read(np.asarray(ids, dtype=np.int64) - m.row_start)
            return normalise_rows(values) if metric == "cosine" else values

        return lambda ids: score_with_rows(queries, ids, rows_of)

    def select(self, name: str, features: np.ndarray, labels: np.ndarray, step: int, rule, k: int, *,
               with_rows: bool = True) -> tuple[Selection, np.ndarray | None]:
        """See WeightStore.select: the store's own index, no copies of the features."""
        with self._cond:
            while True:
                out = self.try_select(name, features, labels, step, rule, k, with_rows=with_rows)
                if out is not None:
                    return out
                self._wait_for_steps()
