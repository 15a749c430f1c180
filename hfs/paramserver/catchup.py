"""Closed-form catch-up: torch's dense SGD on a whole matrix, paid for only on the rows a step needs.

``torch.optim.SGD`` (dampening 0, no nesterov) moves *every* row of a parameter every step:
a row whose gradient is zero still decays (weight decay) and coasts on its momentum. With a
zero gradient one step is linear in the row's state ``(w, buf)``, with the same two scalars
for every element::

    buf' = momentum * buf + wd * w
    w'   = w - lr * buf' = (1 - lr * wd) * w - lr * momentum * buf

i.e. ``[w', buf'] = M_t [w, buf]`` with ``M_t = [[1 - lr_t wd, -lr_t mu], [wd, mu]]``. A row
idle since tick ``a`` is made current at tick ``n`` by one 2x2 product ``M_{n-1} ... M_a``
applied to all its elements: exact, not an approximation (the only difference to stepping
is float round-off).

:class:`StepHistory` records ``M_t`` for every applied step (a *tick*) and answers the
product over ``[a, n)`` for many ``a`` at once. Products of aligned power-of-two blocks of
ticks are kept (a segment tree that only grows at its right end, two entries per tick), so
any suffix is at most ~2 log2(n) block products, batched over the distinct ``a`` of a
request. The products are float64; no inverse is ever taken (``det M = mu`` would make
inverses blow up as ``mu^-n``).

:class:`RowClock` keeps, per row, the tick it is current at; its kernel
(:mod:`hfs.paramserver.kernels`) applies the catch-up to a set of rows in place. The history
is forgotten whenever every row is current (after a snapshot or a restore), so its memory
(64 to 128 bytes per tick) is bounded by the steps between snapshots.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import numpy as np

from hfs.paramserver.kernels import NumpyKernel
from hfs.paramserver.scratch import Scratch

if TYPE_CHECKING:
    from hfs.paramserver.base import HParams
    from hfs.paramserver.kernels import RowKernel

#: The update rules of a weight-store matrix (``paramserver.update_rule``).
UPDATE_RULES = ("catchup", "lazy", "dense")


def zero_grad_transition(lr: float, momentum: float, weight_decay: float) -> np.ndarray:
    """``M`` of one SGD step with a zero gradient, acting on ``[w, buf]`` (float64, 2x2)."""
    return np.array([[1.0 - lr * weight_decay, -lr * momentum],
                     [weight_decay, momentum]], dtype=np.float64)


#: Levels of the block table (ticks between two snapshots stay far below 2^62).
MAX_LEVELS = 63


def _level_offsets(capacity: int) -> np.ndarray:
    """Where each level starts in a block table for ``capacity`` ticks: level k holds capacity >> k blocks."""
    sizes = np.array([capacity >> k for k in range(MAX_LEVELS)], dtype=np.int64)
    return np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)


#: Suffix products of this many most recent start ticks are kept ready (rows touched lately are the
#: common case: they skip the block-tree walk).
RECENT_TICKS = 64


class StepHistory:
    """Zero-gradient transitions of the applied ticks, with batched suffix products.

    The block products live in one float64 array, level after level (``blocks[offsets[k] + j]``
    is the product over ticks ``[j * 2^k, (j + 1) * 2^k)``, the later ticks on the left), so a
    compiled kernel walks the same tables as :meth:`suffix_products` (:meth:`tables`).
    """

    def __init__(self) -> None:
        self.num_ticks = 0
        self._capacity = 16  # ticks the block table has room for (a power of two)
        self._offsets = _level_offsets(self._capacity)
        self._blocks = np.empty((2 * self._capacity, 2, 2), dtype=np.float64)
        # recent[i] = M_{n-1} ... M_{n-1-i}: the suffix product from start n-1-i (first min(n, RECENT_TICKS) valid)
        self._recent = np.empty((RECENT_TICKS, 2, 2), dtype=np.float64)

    def _grow(self) -> None:
        """Double the room; every level's complete blocks move to their new offsets."""
        capacity = 2 * self._capacity
        offsets = _level_offsets(capacity)
        blocks = np.empty((2 * capacity, 2, 2), dtype=np.float64)
        for level in range(int(self.num_ticks).bit_length()):
            count = self.num_ticks >> level
            blocks[offsets[level]:offsets[level] + count] = self._blocks[self._offsets[level]:self._offsets[level] + count]
        self._capacity, self._offsets, self._blocks = capacity, offsets, blocks

    def append(self, transition: np.ndarray) -> None:
        """Record the next tick's transition; complete the aligned blocks it closes."""
        tick = self.num_ticks
        if tick >= self._capacity:
            self._grow()
        blocks, offsets = self._blocks, self._offsets
        blocks[tick] = transition  # level 0 starts at offset 0
        level, index = 0, tick
        while index % 2 == 1:  # this block closes a block of the next level
            below = offsets[level]
            level, index = level + 1, index // 2
            blocks[offsets[level] + index] = blocks[below + 2 * index + 1] @ blocks[below + 2 * index]
        self._recent[1:] = transition @ self._recent[:-1]  # every recent suffix gains this tick on the left
        self._recent[0] = transition
        self.num_ticks = tick + 1

    def tables(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(block products, level offsets, valid recent suffixes): what a compiled kernel walks."""
        return self._blocks, self._offsets, self._recent[:min(self.num_ticks, RECENT_TICKS)]

    def suffix_products(self, starts: np.ndarray) -> np.ndarray:
        """``M_{n-1} ... M_a`` for each ``a`` in ``starts`` (identity where ``a == n``), shape (len, 2, 2)."""
        n = self.num_ticks
        pos = np.asarray(starts, dtype=np.int64).copy()
        if pos.size and (pos.min() < 0 or pos.max() > n):
            raise ValueError(f"catch-up start ticks must lie in [0, {n}]")
        out = np.broadcast_to(np.eye(2), (pos.size, 2, 2)).copy()
        back = n - pos  # ticks to catch up on
        recent = (back > 0) & (back <= min(n, RECENT_TICKS))
        out[recent] = self._recent[back[recent] - 1]
        active = np.flatnonzero(back > RECENT_TICKS)
        while active.size:
            x = pos[active]
            remaining = n - x
            # the largest aligned block starting at x that ends at or before n
            lowbit = np.where(x == 0, np.int64(1) << 62, x & -x)
            fit = np.int64(1) << (np.floor(np.log2(remaining)).astype(np.int64))
            size = np.minimum(lowbit, fit)
            level = np.log2(size).astype(np.int64)
            for k in np.unique(level):
                sel = level == k
                blocks = self._blocks[self._offsets[k] + (x[sel] >> k)]
                out[active[sel]] = blocks @ out[active[sel]]
            pos[active] = x + size
            active = active[pos[active] < n]
        return out


class RowClock:
    """Per-row tick bookkeeping of the catchup rule for one matrix (rows local to a shard).

    The arithmetic on the rows is its ``kernel``'s (:mod:`hfs.paramserver.kernels`: the fused
    numba pass or the numpy fallback); the clock holds the history and the ticks.
    """

    def __init__(self, num_rows: int, kernel: "RowKernel | None" = None) -> None:
        self.history = StepHistory()
        self.row_tick = np.zeros(int(num_rows), dtype=np.int64)
        self.kernel = NumpyKernel() if kernel is None else kernel

    @property
    def now(self) -> int:
        return self.history.num_ticks

    def stale(self, rows: np.ndarray) -> np.ndarray:
        """The subset of ``rows`` (local indices) that missed ticks."""
        return rows[self.row_tick[rows] < self.now]

    def catch_up(self, weight: np.ndarray, momentum: np.ndarray, rows: np.ndarray,
                 scratch: Scratch | None = None) -> int:
        """Bring ``rows`` (local indices in range; repeats are harmless) of ``weight``/``momentum`` to
        the current tick, in place. Returns how many rows moved. ``scratch`` holds the numpy
        kernel's work arrays between calls (else fresh ones).
        """
        return self.kernel.catch_up(self, weight, momentum, np.asarray(rows, dtype=np.int64), scratch)

    def read(self, weight: np.ndarray, momentum: np.ndarray, rows: np.ndarray,
             scratch: Scratch | None = None, out: np.ndarray | None = None,
             answer: Callable[[np.ndarray], None] | None = None) -> np.ndarray:
        """``weight[rows]`` as dense SGD has them now (a new array, or ``out``); repeats are harmless.

        Nothing is written back: a stale row's weights are computed into the answer from its
        weight and momentum, and the row catches up in place when it is next pushed, set,
        scanned or snapshotted, from the same tick with the same product, so to the same bits.
        (A sampled get + push thus moves each row's weight and momentum once each way.) ``out``
        (float32 (n, dim), C order) lets the server write them straight into a reply buffer;
        ``answer`` is called with the values as soon as they are known (the server sends its
        reply there).
        """
        return self.kernel.read(self, weight, momentum, np.asarray(rows, dtype=np.int64), scratch, out, answer)

    def catch_up_range(self, weight: np.ndarray, momentum: np.ndarray, start: int, stop: int,
                       scratch: Scratch | None = None) -> int:
        """Catch up the contiguous local rows ``start..stop-1``."""
        return self.kernel.catch_up_range(self, weight, momentum, start, stop, scratch)

    def step(self, weight: np.ndarray, momentum: np.ndarray, rows: np.ndarray, grads: np.ndarray, hp: "HParams",
             scratch: Scratch | None = None) -> None:
        """One applied step: unique ``rows`` caught up and given SGD with ``grads``, the tick recorded."""
        self.kernel.sgd(weight, momentum, rows, grads, hp, scratch, clock=self)
        self.tick(rows, zero_grad_transition(hp.lr, hp.momentum, hp.weight_decay))

    def tick(self, rows: np.ndarray, transition: np.ndarray) -> None:
        """Record one applied step whose real update touched ``rows`` (already current before it)."""
        self.history.append(transition)
        self.row_tick[rows] = self.now

    def forget_history(self) -> None:
        """Every row is current: drop the recorded ticks (the rows' state already holds them)."""
        if (self.row_tick != self.now).any():
            raise RuntimeError("forget_history with rows still behind")
        self.history = StepHistory()
        self.row_tick[:] = 0
