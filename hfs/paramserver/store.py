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

The store is the facade of parts with one job each, all under its one lock: the matrices'
rows and update rules (``matrix.py``), the step barrier (``barrier.py``: workers, held
pushes, deadlines), the snapshotter (``snapshotter.py``) and each matrix's index with the
selection answered from it (``indexing.py``).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import numpy as np

from hfs.paramserver import snapshots as snaps
from hfs.paramserver.barrier import StepBarrier
from hfs.paramserver.base import HParams, StoreError, WeightStore
from hfs.paramserver.indexing import MatrixIndexes, check_labels, check_query
from hfs.paramserver.kernels import load_kernel
from hfs.paramserver.matrix import Matrix, MatrixSpec, check_rule
from hfs.paramserver.sharding import ShardSpec
from hfs.paramserver.snapshotter import Snapshotter
from hfs.samplers.owned import IndexSpec
from hfs.samplers.selection import Selection
from hfs.utils.typed import check_fields

log = logging.getLogger(__name__)

T = TypeVar("T")


class InProcessStore(WeightStore):
    """Matrices in this process's RAM; thread-safe; the engine of the server too.

    ``timeout_s`` bounds a synchronous step; ``snapshot_dir`` (optional) enables snapshots,
    of which the newest ``keep_snapshots`` automatic ones are kept; ``snapshot_every_steps``
    / ``snapshot_every_s`` (0 = off) take automatic snapshots after applied steps;
    ``update_rule`` is the rule of matrices created without one (see the module docstring);
    ``kernel`` (auto | numba | numpy) the row kernels of the catch-up and SGD
    (:mod:`hfs.paramserver.kernels`); ``index_workdir`` (a server's) where index builds put
    their files, whatever a spec says.
    """

    def __init__(self, snapshot_dir: str | Path | None = None, *, keep_snapshots: int = 3,
                 timeout_s: float = 60.0, snapshot_every_steps: int = 0, snapshot_every_s: float = 0.0,
                 shard: ShardSpec = ShardSpec(), update_rule: str = "catchup",
                 index_workdir: str | Path | None = None, kernel: str = "auto") -> None:
        self.update_rule = check_rule(update_rule)
        self.kernel = load_kernel(kernel)
        self.shard = shard
        self._matrices: dict[str, Matrix] = {}
        self._cond = threading.Condition(threading.RLock())
        self._barrier = StepBarrier(timeout_s)
        self._snapshots = Snapshotter(snapshot_dir, keep=keep_snapshots, every_steps=snapshot_every_steps,
                                      every_s=snapshot_every_s)
        self._indexes = MatrixIndexes(self._local_chunks,
                                      str(index_workdir) if index_workdir is not None else None)
        self._counters = collections.Counter(
            pushes=0, rows_pushed=0, steps_applied=0, rows_applied=0, gets=0, rows_read=0, sets=0, snapshots=0,
            failed_steps=0, selects=0)

    # -- helpers ---------------------------------------------------------------------
    @property
    def timeout_s(self) -> float:
        return self._barrier.timeout_s

    @property
    def snapshot_dir(self) -> Path | None:
        return self._snapshots.folder

    def _matrix(self, name: str) -> Matrix:
        try:
            return self._matrices[name]
        except KeyError:
            known = ", ".join(sorted(self._matrices)) or "none"
            raise StoreError(f"no matrix named {name!r} (known: {known})") from None

    @property
    def step(self) -> int:
        """The next step to run: one past the highest applied step of any matrix."""
        return max((m.last_applied for m in self._matrices.values()), default=-1) + 1

    def _until(self, attempt: Callable[[], T | None]) -> T:
        """``attempt()``'s answer, waiting (lock released) while it is None: a step before it is pending."""
        with self._cond:
            while True:
                out = attempt()
                if out is not None:
                    return out
                self._wait_for_steps()

    def _wait_for_steps(self) -> None:
        """Block (lock released) until something changes or the earliest step deadline passes."""
        deadline = self.next_deadline()
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic()) + 1e-3
        self._cond.wait(timeout)
        self.expire()

    def _ready(self, m: Matrix, step: int | None) -> bool:
        """True when no step before ``step`` is pending (always, without a step); raises if one of them failed."""
        return step is None or self._barrier.ready(m.name, int(step), m.last_applied)

    # -- workers ---------------------------------------------------------------------
    def register(self, worker: str) -> None:
        with self._cond:
            self._barrier.register(worker)
            log.info("worker %s registered (%d now)", worker, len(self._barrier.workers))

    def leave(self, worker: str) -> None:
        with self._cond:
            self._barrier.leave(worker)
            self._apply_due()
            self._cond.notify_all()
            log.info("worker %s left (%d remain)", worker, len(self._barrier.workers))

    def workers(self) -> list[str]:
        with self._cond:
            return self._barrier.workers

    # -- matrices --------------------------------------------------------------------
    def create(self, name: str, num_rows: int, dim: int, *, init: str = "gaussian", std: float = 0.01,
               seed: int = 0, exist_ok: bool = False, update_rule: str | None = None) -> None:
        """See WeightStore.create. An existing matrix kept by ``exist_ok`` switches to ``update_rule``
        when one is given (its rows first caught up under the old rule)."""
        snaps.check_plain_name(name, "matrix name")
        spec = check_fields(MatrixSpec(num_rows, dim, init, std, seed, update_rule), f"matrix {name!r}",
                            error=StoreError, finite=True)
        rule = spec.update_rule or self.update_rule
        with self._cond:
            have = self._matrices.get(name)
            if have is not None:
                if not exist_ok or (have.num_rows, have.dim) != (spec.rows, spec.dim):
                    raise StoreError(f"matrix {name!r} already exists with shape ({have.num_rows}, {have.dim})")
                if update_rule is not None and have.update_rule != rule:
                    log.info("matrix %s: update rule %s -> %s", name, have.update_rule, rule)
                    have.set_update_rule(rule)
                return
            m = self._matrices[name] = Matrix.allocate(name, spec, self.shard, rule, self.kernel)
            self._snapshots.dirty = True
            log.info("created matrix %s: rows %d..%d of %d, dim %d (%s, update rule %s)", name, m.row_start,
                     m.row_end, spec.rows, spec.dim, spec.init, rule)

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

    # -- reads -----------------------------------------------------------------------
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
            local = m.local_rows(rows)
            if not self._ready(m, step):
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
            m.check_range(start, stop)
            if not self._ready(m, step):
                return None
            self._counters["gets"] += 1
            self._counters["rows_read"] += stop - start
            return m.read_range(start - m.row_start, stop - m.row_start)

    def get_rows(self, name: str, rows: np.ndarray, step: int | None = None) -> np.ndarray:
        return self._until(lambda: self.try_get_rows(name, rows, step))

    def iter_chunks(self, name: str, chunk_rows: int = 65536) -> Iterator[tuple[int, np.ndarray]]:
        with self._cond:
            m = self._matrix(name)
            start, end = m.row_start, m.row_end
        for first in range(start, end, max(1, int(chunk_rows))):
            chunk = self.try_get_range(name, first, min(first + chunk_rows, end))
            yield first, chunk

    # -- writes ----------------------------------------------------------------------
    def set_rows(self, name: str, rows: np.ndarray, values: np.ndarray) -> None:
        with self._cond:
            m = self._matrix(name)
            local = m.local_rows(rows)
            m.set_rows(local, m.checked_values(values, local.size, "values"))
            self._counters["sets"] += 1
            self._snapshots.dirty = True
            self._indexes.rows_set(m, np.unique(local))  # the index sees every change, as after a step

    def set_hparams(self, name: str, hparams: HParams) -> None:
        if not isinstance(hparams, HParams):
            raise StoreError(f"hparams must be HParams, got {type(hparams).__name__}")
        hparams = check_fields(hparams, "hparams", error=StoreError, finite=True)  # plain floats, each >= 0
        with self._cond:
            self._matrix(name).hparams = hparams

    def push_grads(self, name: str, rows: np.ndarray, grads: np.ndarray, step: int, *,
                   worker: str | None = None, copy: bool = True) -> None:
        """See WeightStore.push_grads. ``copy=False``: the caller will not modify ``rows``/``grads``
        before the step is applied (the server passes read-only message buffers), so a pending
        step keeps them without a copy."""
        with self._cond:
            m = self._matrix(name)
            local = m.local_rows(rows)
            grads = m.checked_values(grads, local.size, "grads")
            step = int(step)
            worker = self._barrier.resolve(worker)
            self._barrier.check_push(name, step, m.last_applied)
            if m.hparams is None:
                raise StoreError(f"matrix {name!r} has no learning rate yet: call set_hparams before pushing")
            self._counters["pushes"] += 1
            self._counters["rows_pushed"] += local.size
            if self._barrier.applies_at_once(name, step):
                self._apply(m, step, [local], [grads])
                return
            if copy:  # held until the other workers pushed: the caller may reuse its arrays
                local, grads = (local.copy() if local is rows else local), np.array(grads, copy=True)
            self._barrier.hold(name, step, worker, local, grads)
            if self._apply_due(m):
                self._cond.notify_all()

    def _apply_due(self, only: Matrix | None = None) -> bool:
        """Apply the complete held steps (of ``only``, else of every matrix) in step order; True if any was."""
        applied = False
        for m in [only] if only is not None else list(self._matrices.values()):
            for pending in self._barrier.pop_complete(m.name):
                self._apply(m, pending.step, pending.rows, pending.grads)
                applied = True
        return applied

    def _apply(self, m: Matrix, step: int, rows: list[np.ndarray], grads: list[np.ndarray]) -> None:
        unique = m.apply_step(step, rows, grads)
        self._indexes.after_step(m, unique, step)
        self._counters["rows_applied"] += unique.size
        self._counters["steps_applied"] += 1
        self._snapshots.dirty = True
        if self._snapshots.periodic:
            self._snapshots.take_if_due(self.step, self.snapshot)

    # -- synchronous-step deadlines ----------------------------------------------------
    def next_deadline(self) -> float | None:
        with self._cond:
            return self._barrier.next_deadline()

    def expire(self, now: float | None = None) -> list[str]:
        """Fail the pending steps whose deadline passed; return their error messages."""
        now = time.monotonic() if now is None else now
        with self._cond:
            messages = self._barrier.expire(now)
            self._counters["failed_steps"] += len(messages)
            self._apply_due()
            if messages:
                self._cond.notify_all()
        return messages

    # -- persistence -----------------------------------------------------------------
    def snapshot(self, tag: str | None = None) -> str:
        self._snapshots.require_folder()
        with self._cond:
            step = self.step
            name, seconds = self._snapshots.write(self._matrices, step, self.shard, tag)
            self._counters["snapshots"] += 1
        self._snapshots.prune(name, step, seconds)
        return name

    def restore(self, tag: str = "latest") -> int:
        folder, step, loaded = self._snapshots.load(tag, self.shard, self.kernel)
        with self._cond:
            self._matrices = loaded
            self._barrier.forget_steps()
            self._snapshots.restored(step)
            self._indexes.rebuild(loaded)
            self._cond.notify_all()
        log.info("restored snapshot %s (step %d, %d matrices)", folder.name, step, len(loaded))
        return step

    def tick(self) -> None:
        """Housekeeping a server calls between messages: fail overdue steps, timed snapshots, and
        index builds in flight (one snapshot chunk per ``INDEX_TICK_S``, a finished build swapped in)."""
        self.expire()
        with self._cond:
            if self._snapshots.periodic:
                self._snapshots.take_if_due(self.step, self.snapshot)
            self._indexes.advance_all()

    def stats(self) -> dict:
        with self._cond:
            return {"step": self.step, "workers": self._barrier.workers, "matrices": self.matrices(),
                    "kernel": self.kernel.name, "indexes": self._indexes.upkeep(),
                    "bytes_held": int(sum(m.weight.nbytes + m.momentum.nbytes for m in self._matrices.values())),
                    "pending_steps": self._barrier.held_steps(), **self._counters, **self._indexes.counters}

    def close(self) -> None:
        """Stop index builds in flight and release the indexes. Idempotent."""
        with self._cond:
            self._indexes.close()

    # -- the index over each matrix's rows, and selection -------------------------------
    def attach_index(self, name: str, spec: IndexSpec) -> bool:
        """See WeightStore.attach_index: this store indexes its own rows (ids local to the shard,
        answered as global ids). A server replaces the spec's ``workdir`` with its own."""
        with self._cond:
            return self._indexes.attach(self._matrix(name), spec)

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
                chunk = m.read_range(first, stop)
            yield first, chunk
            first = stop

    def index_stats(self, name: str) -> dict:
        with self._cond:
            self._matrix(name)
            return self._indexes.stats(name)

    def try_search(self, name: str, features: np.ndarray, k: int, step: int | None = None, *,
                   fresh: bool = False) -> tuple[np.ndarray, np.ndarray] | None:
        """(B, k') global ids and similarities of this store's best rows per query (k' = 0 while no
        index is ready), or None while a step before ``step`` is pending; ``fresh``: similarities
        under the current rows (see ``OwnedIndex.answer``)."""
        with self._cond:
            m = self._matrix(name)
            features, k = check_query(m, features, k)
            if not self._ready(m, step):
                return None
            self._counters["selects"] += 1
            return self._indexes.search(m, features, k, fresh=fresh)

    def try_select(self, name: str, features: np.ndarray, labels: np.ndarray, step: int, rule, k: int, *,
                   with_rows: bool = True, answer: Callable[[Selection, np.ndarray], None] | None = None
                   ) -> tuple[Selection, np.ndarray | None] | None:
        """``select`` without blocking: None while a step before ``step`` is pending. ``answer``
        (with rows): called with the selection and the rows' values as soon as they are known, as
        in :meth:`try_get_rows`."""
        with self._cond:
            m = self._matrix(name)
            labels = check_labels(m, labels, features, with_rows)
            features, k = check_query(m, features, k)
            if not self._ready(m, step):
                return None
            self._counters["selects"] += 1
            chosen = self._indexes.choose(m, features, labels, k, step, rule)
            if not with_rows:
                return chosen, None
            local = chosen.active - m.row_start if m.row_start else chosen.active
            self._counters["rows_read"] += local.size
            return chosen, m.read(local, answer=None if answer is None else lambda values: answer(chosen, values))

    def select(self, name: str, features: np.ndarray, labels: np.ndarray, step: int, rule, k: int, *,
               with_rows: bool = True) -> tuple[Selection, np.ndarray | None]:
        """See WeightStore.select: the store's own index, no copies of the features."""
        return self._until(lambda: self.try_select(name, features, labels, step, rule, k, with_rows=with_rows))
