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

from typing import Callable

import numpy as np

from hfs.paramserver.scratch import Scratch, take_rows

#: The update rules of a weight-store matrix (``paramserver.update_rule``).
UPDATE_RULES = ("catchup", "lazy", "dense")


def zero_grad_transition(lr: float, momentum: float, weight_decay: float) -> np.ndarray:
    """``M`` of one SGD step with a zero gradient, acting on ``[w, buf]`` (float64, 2x2)."""
    return np.array([[1.0 - lr * weight_decay, -lr * momentum],
                     [weight_decay, momentum]], dtype=np.float64)


#: Suffix products of this many most recent start ticks are kept ready (rows touched lately are the
#: common case: they skip the block-tree walk).
RECENT_TICKS = 64


class StepHistory:
    """Zero-gradient transitions of the applied ticks, with batched suffix products."""

    def __init__(self) -> None:
        self.num_ticks = 0
        # levels[k][j] = M over ticks [j * 2^k, (j + 1) * 2^k), the later ticks on the left
        self._levels: list[np.ndarray] = []
        # recent[i] = M_{n-1} ... M_{n-1-i}: the suffix product from start n-1-i (first min(n, RECENT_TICKS) valid)
        self._recent = np.empty((RECENT_TICKS, 2, 2), dtype=np.float64)

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
        self._recent[1:] = transition @ self._recent[:-1]  # every recent suffix gains this tick on the left
        self._recent[0] = transition
        self.num_ticks = tick + 1

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

    def catch_up(self, weight: np.ndarray, momentum: np.ndarray, rows: np.ndarray,
                 scratch: Scratch | None = None) -> int:
        """Bring ``rows`` (local indices in range; repeats are harmless) of ``weight``/``momentum`` to
        the current tick, in place. Returns how many rows moved. Rows already current cost one
        comparison each. ``scratch`` holds the four work arrays between calls (else fresh ones).
        """
        rows = self.stale(np.asarray(rows, dtype=np.int64))
        if rows.size:
            scratch = Scratch() if scratch is None else scratch
            self._advance(weight, momentum, rows, scratch, scratch.get(2, rows.size, weight.shape[1]))
        return int(rows.size)

    def read(self, weight: np.ndarray, momentum: np.ndarray, rows: np.ndarray,
             scratch: Scratch | None = None, out: np.ndarray | None = None,
             answer: Callable[[np.ndarray], None] | None = None) -> np.ndarray:
        """``weight[rows]`` as dense SGD has them now (a new array, or ``out``), caught up in place first.

        When most rows are behind (the usual sampled read) all of them go through the
        catch-up, the current ones with the identity (exact: ``w * 1 + buf * 0``), and the
        caught-up weights are written straight into the answer: one gather fewer. ``out``
        (float32 (n, dim), C order) lets the server write them straight into a reply buffer.
        ``answer`` is called with the values as soon as they are known, before the caught-up
        rows are written back into ``weight``/``momentum``: a server sends its reply there, so
        that write-back overlaps the client's work instead of delaying the reply.
        """
        rows = np.asarray(rows, dtype=np.int64)
        behind = int(np.count_nonzero(self.row_tick[rows] < self.now))
        if 2 * behind < rows.size or behind == 0:
            self.catch_up(weight, momentum, rows, scratch)
            values = np.take(weight, rows, axis=0) if out is None else take_rows(weight, rows, out)
            if answer is not None:
                answer(values)
            return values
        if out is None:
            out = np.empty((rows.size, weight.shape[1]), dtype=weight.dtype)
        self._advance(weight, momentum, rows, Scratch() if scratch is None else scratch, out, answer)
        return out

    def _advance(self, weight: np.ndarray, momentum: np.ndarray, rows: np.ndarray, scratch: Scratch,
                 new_w: np.ndarray, answer: Callable[[np.ndarray], None] | None = None) -> None:
        """The catch-up of ``rows`` (a current row's product is the identity), the new weights also
        left in ``new_w`` (and handed to ``answer`` before they are written back); work arrays in
        slots 0, 1 and 3 of ``scratch``."""
        starts, which = np.unique(self.row_tick[rows], return_inverse=True)
        # products in float64, applied in float32 (the rows' own precision)
        coef = self.history.suffix_products(starts).astype(np.float32)[which]
        n, dim = rows.size, weight.shape[1]
        w = take_rows(weight, rows, scratch.get(0, n, dim))
        buf = take_rows(momentum, rows, scratch.get(1, n, dim))
        np.multiply(w, coef[:, 0, 0, None], out=new_w)
        new_w += np.multiply(buf, coef[:, 0, 1, None], out=scratch.get(3, n, dim))
        buf *= coef[:, 1, 1, None]
        w *= coef[:, 1, 0, None]
        buf += w
        if answer is not None:
            answer(new_w)
        weight[rows] = new_w
        momentum[rows] = buf
        self.row_tick[rows] = self.now

    def catch_up_range(self, weight: np.ndarray, momentum: np.ndarray, start: int, stop: int,
                       scratch: Scratch | None = None, chunk_rows: int = 8192) -> int:
        """Catch up the contiguous local rows ``start..stop-1``, a bounded chunk at a time."""
        moved = 0
        for first in range(start, stop, chunk_rows):
            moved += self.catch_up(weight, momentum, np.arange(first, min(first + chunk_rows, stop), dtype=np.int64),
                                   scratch)
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
