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

:class:`RowClock` keeps, per row, the tick it is current at and applies the catch-up to a
set of rows in place. The history is forgotten whenever every row is current (after a
snapshot or a restore), so its memory (64 bytes per tick) is bounded by the steps between
snapshots.
"""

from __future__ import annotations

import numpy as np

#: The update rules of a weight-store matrix (``paramserver.update_rule``).
UPDATE_RULES = ("catchup", "lazy", "dense")


def zero_grad_transition(lr: float, momentum: float, weight_decay: float) -> np.ndarray:
    """``M`` of one SGD step with a zero gradient, acting on ``[w, buf]`` (float64, 2x2)."""
    return np.array([[1.0 - lr * weight_decay, -lr * momentum],
                     [weight_decay, momentum]], dtype=np.float64)


class StepHistory:
    """Zero-gradient transitions of the applied ticks, with batched suffix products."""

    def __init__(self) -> None:
        self.num_ticks = 0
        # levels[k][j] = M over ticks [j * 2^k, (j + 1) * 2^k), the later ticks on the left
        self._levels: list[np.ndarray] = []

    def _slot(self, level: int, index: int) -> np.ndarray:
        while len(self._levels) <= level:
            self._levels.append(np.empty((16, 2, 2), dtype=np.float64))
        table = self._levels[level]
        if index >= table.shape[0]:
            grown = np.empty((max(2 * table.shape[0], index + 1), 2, 2), dtype=np.float64)
            grown[:table.shape[0]] = table
            self._levels[level] = table = grown
        return table

    def append(self, transition: np.ndarray) -> None:
        """Record the next tick's transition; complete the aligned blocks it closes."""
        tick = self.num_ticks
        self._slot(0, tick)[tick] = transition
        level, index = 0, tick
        while index % 2 == 1:  # this block closes a block of the next level
            below = self._levels[level]
            level, index = level + 1, index // 2
            self._slot(level, index)[index] = below[2 * index + 1] @ below[2 * index]
        self.num_ticks = tick + 1

    def suffix_products(self, starts: np.ndarray) -> np.ndarray:
        """``M_{n-1} ... M_a`` for each ``a`` in ``starts`` (identity where ``a == n``), shape (len, 2, 2)."""
        n = self.num_ticks
        pos = np.asarray(starts, dtype=np.int64).copy()
        if pos.size and (pos.min() < 0 or pos.max() > n):
            raise ValueError(f"catch-up start ticks must lie in [0, {n}]")
        out = np.broadcast_to(np.eye(2), (pos.size, 2, 2)).copy()
        active = np.flatnonzero(pos < n)
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
                blocks = self._levels[int(k)][x[sel] >> k]
                out[active[sel]] = blocks @ out[active[sel]]
            pos[active] = x + size
            active = active[pos[active] < n]
        return out


class RowClock:
    """Per-row tick bookkeeping of the catch-up rule for one matrix (rows local to a shard)."""

    def __init__(self, num_rows: int) -> None:
        self.history = StepHistory()
        self.row_tick = np.zeros(int(num_rows), dtype=np.int64)

    @property
    def now(self) -> int:
        return self.history.num_ticks

    def stale(self, rows: np.ndarray) -> np.ndarray:
        """The subset of ``rows`` (local indices) that missed ticks."""
        return rows[self.row_tick[rows] < self.now]

    def catch_up(self, weight: np.ndarray, momentum: np.ndarray, rows: np.ndarray) -> int:
        """Bring ``rows`` (local indices; repeats are harmless) of ``weight``/``momentum`` to the current
        tick, in place. Returns how many rows moved. Rows already current cost one comparison each.
        """
        rows = self.stale(np.asarray(rows, dtype=np.int64))
        if rows.size == 0:
            return 0
        starts, which = np.unique(self.row_tick[rows], return_inverse=True)
        # products in float64, applied in float32 (the rows' own precision), with 3 temporaries
        coef = self.history.suffix_products(starts).astype(np.float32)[which]
        w, buf = weight[rows], momentum[rows]
        new_w = w * coef[:, 0, 0, None]
        new_w += buf * coef[:, 0, 1, None]
        buf *= coef[:, 1, 1, None]
        w *= coef[:, 1, 0, None]
        buf += w
        weight[rows] = new_w
        momentum[rows] = buf
        self.row_tick[rows] = self.now
        return int(rows.size)

    def catch_up_range(self, weight: np.ndarray, momentum: np.ndarray, start: int, stop: int,
                       chunk_rows: int = 65536) -> int:
        """Catch up the contiguous local rows ``start..stop-1``, a bounded chunk at a time."""
        moved = 0
        for first in range(start, stop, chunk_rows):
            moved += self.catch_up(weight, momentum, np.arange(first, min(first + chunk_rows, stop), dtype=np.int64))
        return moved

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
