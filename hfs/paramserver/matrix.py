"""One matrix of the weight store: its rows (this shard's), their momentum and its update rule.

A :class:`Matrix` is two C-contiguous float32 arrays, weights and momentum (C x D x 4 bytes
each; the momentum is allocated zeroed and lazily mapped, so the OS maps its pages only when
rows are first updated), plus under the ``catchup`` rule the step each row is current at
(:class:`~hfs.paramserver.catchup.RowClock`). Nothing else grows with C. It checks what a
request hands it (row ids in its range, values of its shape) and applies a step's summed
gradients under its rule; who pushed what, and when a step is complete, is the step
barrier's business (``barrier.py``), not the matrix's.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from hfs.paramserver.base import HParams, StoreError
from hfs.paramserver.catchup import UPDATE_RULES, RowClock
from hfs.paramserver.kernels import NumpyKernel, RowKernel, sgd_rows
from hfs.paramserver.scratch import Scratch, take_rows
from hfs.paramserver.sharding import ShardSpec
from hfs.utils.typed import rules

log = logging.getLogger(__name__)

INITS = ("gaussian", "uniform", "zeros")
#: Largest matrix a `create` may ask for (rows, dim); memory is checked separately.
MAX_ROWS = 1 << 40
MAX_DIM = 1 << 20
#: Rows per seeded block of the initialisation: block b draws from rng(seed, b), so the
#: values do not depend on how the matrix is split across shards.
INIT_BLOCK_ROWS = 16384


@dataclass(frozen=True)
class MatrixSpec:
    """What ``create`` asks for, with the rules every caller (in process or over the wire) is held to."""

    rows: int = field(metadata=rules(gt=0, le=MAX_ROWS))
    dim: int = field(metadata=rules(gt=0, le=MAX_DIM))
    init: str = field(default="gaussian", metadata=rules(choices=INITS))
    std: float = field(default=0.01, metadata=rules(ge=0.0))
    seed: int = field(default=0, metadata=rules(ge=0))
    update_rule: str | None = field(default=None, metadata=rules(choices=UPDATE_RULES))


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


def check_rule(rule: str) -> str:
    """``rule`` if it is an update rule, else a StoreError naming them."""
    if rule not in UPDATE_RULES:
        raise StoreError(f"update_rule must be one of {', '.join(UPDATE_RULES)}; got {rule!r}")
    return rule


def as_rows(rows: object, what: str = "rows") -> np.ndarray:
    """``rows`` as int64 (no copy when they are already), or a StoreError: only 1-D integer arrays are row ids."""
    arr = np.asarray(rows)
    if arr.ndim != 1 or arr.dtype.kind not in "iu":
        raise StoreError(f"{what} must be a 1-D integer array, got {arr.dtype}{list(arr.shape)}")
    return arr.astype(np.int64, copy=False)


# --------------------------------------------------------------------------- the matrix


@dataclass
class Matrix:
    """One named matrix (this shard's rows of it), its momentum, hparams and last applied step."""

    name: str
    num_rows: int
    row_start: int
    weight: np.ndarray
    momentum: np.ndarray
    hparams: HParams | None = None
    last_applied: int = -1
    update_rule: str = "catchup"
    clock: RowClock | None = None
    work: Scratch = field(default_factory=Scratch, repr=False)
    kernel: RowKernel = field(default_factory=NumpyKernel, repr=False)

    def __post_init__(self) -> None:
        if self.update_rule == "catchup" and self.clock is None:
            self.clock = RowClock(self.weight.shape[0], self.kernel)

    @classmethod
    def allocate(cls, name: str, spec: MatrixSpec, shard: ShardSpec, rule: str, kernel: RowKernel) -> "Matrix":
        """This shard's rows of a new matrix, initialised; a StoreError when the memory is not there."""
        start, end = shard.row_range(spec.rows)
        need = (end - start) * spec.dim * 4 * 2
        avail = _available_memory_bytes()
        if avail is not None and need > avail:
            raise StoreError(f"matrix {name!r} needs {need / 2**30:.1f} GiB (weights + momentum) "
                             f"but only {avail / 2**30:.1f} GiB is available")
        try:
            weight = np.empty((end - start, spec.dim), dtype=np.float32)
            momentum = lazy_zeros((end - start, spec.dim))
        except MemoryError:
            raise StoreError(f"not enough memory for matrix {name!r} ({need / 2**30:.1f} GiB)") from None
        init_rows(weight, start, spec.init, spec.std, spec.seed)
        return cls(name, spec.rows, start, weight, momentum, update_rule=rule, kernel=kernel)

    # -- what a request hands the matrix ---------------------------------------------
    def local_rows(self, rows: object) -> np.ndarray:
        """Global row ids -> rows of this shard's arrays; a StoreError names one outside them."""
        arr = as_rows(rows)
        if arr.size:
            lo, hi = int(arr.min()), int(arr.max())
            if lo < self.row_start or hi >= self.row_end:
                bad = lo if lo < self.row_start else hi
                raise StoreError(f"row {bad} out of range [{self.row_start}, {self.row_end}) of matrix {self.name!r}")
        return arr - self.row_start if self.row_start else arr

    def global_ids(self, local: np.ndarray) -> np.ndarray:
        """Rows of this shard's arrays -> global row ids (-1 stays -1: no row)."""
        local = np.asarray(local, dtype=np.int64)
        return np.where(local >= 0, local + self.row_start, -1)

    def checked_values(self, values: object, n: int, what: str) -> np.ndarray:
        """``values`` if they are finite float32 of shape (n, dim), else a StoreError naming ``what``."""
        arr = np.asarray(values)
        if arr.dtype != np.float32:
            raise StoreError(f"{what} for matrix {self.name!r} must be float32, got {arr.dtype}")
        if arr.shape != (n, self.dim):
            raise StoreError(f"{what} for matrix {self.name!r} must have shape ({n}, {self.dim}), "
                             f"got {tuple(arr.shape)}")
        if not np.isfinite(arr).all():
            raise StoreError(f"{what} for matrix {self.name!r} contain NaN or infinity")
        return arr

    def check_range(self, start: int, stop: int) -> None:
        """A StoreError unless global rows [start, stop) lie in this shard."""
        if not (self.row_start <= start <= stop <= self.row_end):
            raise StoreError(f"range [{start}, {stop}) is outside rows [{self.row_start}, {self.row_end}) "
                             f"of matrix {self.name!r}")

    # -- rows ----------------------------------------------------------------------------
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

    def read_range(self, first: int, stop: int) -> np.ndarray:
        """A copy of local rows first..stop-1, caught up to the last step (and left caught up)."""
        self.catch_up_range(first, stop)
        return self.weight[first:stop].copy()

    def set_rows(self, local_rows: np.ndarray, values: np.ndarray) -> None:
        """Overwrite local rows; their momentum moves on from the current step."""
        self.catch_up(local_rows)
        self.weight[local_rows] = values

    def catch_up_range(self, start: int, stop: int) -> None:
        if self.clock is not None:
            self.clock.catch_up_range(self.weight, self.momentum, start, stop, self.work)

    def catch_up_all(self) -> None:
        """Every row current, and the step history forgotten (before a snapshot or a rule change)."""
        if self.clock is not None:
            self.catch_up_range(0, self.weight.shape[0])
            self.clock.forget_history()

    # -- steps ---------------------------------------------------------------------------
    def apply_step(self, step: int, rows: list[np.ndarray], grads: list[np.ndarray]) -> np.ndarray:
        """Step ``step`` with every push's rows and gradients (duplicates summed), under the
        matrix's update rule; returns the unique rows it changed."""
        all_rows = rows[0] if len(rows) == 1 else np.concatenate(rows)
        all_grads = grads[0] if len(grads) == 1 else np.concatenate(grads)
        unique, summed = sum_duplicate_rows(all_rows, all_grads)
        if self.update_rule == "dense":
            sgd_dense(self.weight, self.momentum, unique, summed, self.hparams)
        elif unique.size or self.update_rule == "catchup":  # an empty step still ticks the catchup clock
            self.apply_sgd(unique, summed)
        self.last_applied = step
        return unique

    def apply_sgd(self, unique: np.ndarray, summed: np.ndarray) -> None:
        """One SGD step with the gradients of ``unique`` rows (catchup: caught up in the same pass,
        the step recorded; lazy: the rows alone)."""
        if self.clock is not None:
            self.clock.step(self.weight, self.momentum, unique, summed, self.hparams, self.work)
        else:
            self.kernel.sgd(self.weight, self.momentum, unique, summed, self.hparams, self.work)

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
