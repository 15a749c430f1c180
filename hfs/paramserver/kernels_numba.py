"""The fused row kernels, compiled by numba (the ``fast`` extra): one pass over each row.

Imported only by :func:`hfs.paramserver.kernels.load_kernel` once numba imports. A kernel
works in two steps:

1. a serial pass over the request's row ids: each row's start tick, and the float32 2x2
   suffix product that catches it up, walked in float64 from the same tables as
   :meth:`StepHistory.suffix_products` and kept in a small memo by start tick (rows of a
   request mostly share a few start ticks; the walk of an old tick is ~2 log2(ticks) 2x2
   products, which per row cost more than the row's arithmetic). This pass holds no row data:
   ``n`` x 4 floats;
2. the pass over the rows, serial or over numba's threads: for each row, read the weight and
   momentum once, apply the catch-up, then, for a push, the new gradient's SGD step, and write
   the row back (a read writes only its answer). No temporaries of the request's rows.

The float32 arithmetic is the numpy path's, operation for operation (``fastmath`` off, so no
fused multiply-adds or reordering): both give the same bits.

Every row pass exists twice, as a serial and as a ``prange`` function: numba's cache keys a
function by its bytecode and signature, not by its ``parallel`` flag, so one Python function
compiled both ways would load the wrong one from the cache. Their bodies are one shared
per-row function (inlined).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

#: ``starts[i]`` of a row already current
CURRENT = -1
#: ``starts[i]`` of a repeat of a row caught up earlier in the same request
REPEAT = -2
#: ``row_tick`` of a row while this request catches it up in place (a repeat sees it)
CLAIMED = -1
#: slots of the per-request memo of suffix products, by start tick (a power of two)
MEMO_SLOTS = 1024


# --------------------------------------------------------------------------- coefficients


@njit(nogil=True)
def suffix_product(blocks, offsets, recent, n, start):
    """``M_{n-1} ... M_start`` as (m00, m01, m10, m11), in the order StepHistory.suffix_products
    multiplies: the running product of the last ticks, else the largest aligned blocks from ``start``."""
    back = n - start
    if back <= recent.shape[0]:
        k = back - 1
        return recent[k, 0, 0], recent[k, 0, 1], recent[k, 1, 0], recent[k, 1, 1]
    c00, c01, c10, c11 = 1.0, 0.0, 0.0, 1.0
    x = start
    while x < n:
        remaining = n - x
        size = 1  # the largest aligned block at x that ends at or before n
        while size * 2 <= remaining:
            size *= 2
        if x != 0 and (x & -x) < size:
            size = x & -x
        level = 0
        while (1 << level) < size:
            level += 1
        j = offsets[level] + (x >> level)
        b00, b01, b10, b11 = blocks[j, 0, 0], blocks[j, 0, 1], blocks[j, 1, 0], blocks[j, 1, 1]
        c00, c01, c10, c11 = (b00 * c00 + b01 * c10, b00 * c01 + b01 * c11,
                              b10 * c00 + b11 * c10, b10 * c01 + b11 * c11)
        x += size
    return c00, c01, c10, c11


@njit(nogil=True)
def coefficients(starts, now, blocks, offsets, recent):
    """(n, 4) float32: row i's suffix product from tick ``starts[i]`` to ``now``, rounded as numpy's
    ``astype(float32)``; rows with ``starts[i]`` outside ``[0, now)`` (current) are left unset."""
    coef = np.empty((starts.shape[0], 4), np.float32)
    memo_tick = np.full(MEMO_SLOTS, -1, np.int64)
    memo = np.empty((MEMO_SLOTS, 4), np.float32)
    for i in range(starts.shape[0]):
        t = starts[i]
        if t < 0 or t >= now:
            continue
        slot = t & (MEMO_SLOTS - 1)
        if memo_tick[slot] != t:
            m00, m01, m10, m11 = suffix_product(blocks, offsets, recent, now, t)
            memo[slot, 0], memo[slot, 1] = np.float32(m00), np.float32(m01)
            memo[slot, 2], memo[slot, 3] = np.float32(m10), np.float32(m11)
            memo_tick[slot] = t
        for k in range(4):
            coef[i, k] = memo[slot, k]
    return coef


@njit(nogil=True)
def ticks_and_coefficients(row_tick, rows, now, blocks, offsets, recent):
    """Each row's start tick (``now`` or more: current) and its coefficients (:func:`coefficients`)."""
    starts = np.empty(rows.shape[0], np.int64)
    for i in range(rows.shape[0]):
        starts[i] = row_tick[rows[i]]
    return starts, coefficients(starts, now, blocks, offsets, recent)


@njit(nogil=True, inline="always")
def advance_row(w_row, b_row, coef, i):
    """One row's weight and momentum caught up in place by coefficients ``coef[i]``."""
    c00, c01, c10, c11 = coef[i, 0], coef[i, 1], coef[i, 2], coef[i, 3]
    for d in range(w_row.shape[0]):
        w, b = w_row[d], b_row[d]
        w_row[d] = w * c00 + b * c01
        b_row[d] = b * c11 + w * c10


# --------------------------------------------------------------------------- read


@njit(nogil=True, inline="always")
def read_one(weight, momentum, rows, starts, now, coef, out, i):
    """``out[i]``: row ``rows[i]``'s weights caught up to ``now``; the matrix is not written."""
    w_row, o_row = weight[rows[i]], out[i]
    if starts[i] < now:
        b_row = momentum[rows[i]]
        c00, c01 = coef[i, 0], coef[i, 1]
        for d in range(w_row.shape[0]):
            o_row[d] = w_row[d] * c00 + b_row[d] * c01
    else:
        for d in range(w_row.shape[0]):
            o_row[d] = w_row[d]


def read_rows_serial(weight, momentum, row_tick, rows, now, blocks, offsets, recent, out):
    """``out[i]`` = row ``rows[i]`` (repeats allowed) as dense SGD has it at tick ``now``."""
    starts, coef = ticks_and_coefficients(row_tick, rows, now, blocks, offsets, recent)
    for i in range(rows.shape[0]):
        read_one(weight, momentum, rows, starts, now, coef, out, i)


def read_rows_parallel(weight, momentum, row_tick, rows, now, blocks, offsets, recent, out):
    """:func:`read_rows_serial` over numba's threads (it writes only ``out``, so repeats are safe)."""
    starts, coef = ticks_and_coefficients(row_tick, rows, now, blocks, offsets, recent)
    for i in prange(rows.shape[0]):
        read_one(weight, momentum, rows, starts, now, coef, out, i)


# --------------------------------------------------------------------------- catch-up in place


@njit(nogil=True)
def claim_stale_rows(row_tick, rows, now, blocks, offsets, recent):
    """Per request row: the tick a stale row starts from (its first occurrence claims it), CURRENT,
    or REPEAT; their coefficients; and how many of the request's rows are behind (a repeat counts
    each time, as in the numpy kernel). Serial: it is what makes repeats safe in parallel."""
    starts = np.empty(rows.shape[0], np.int64)
    behind = 0
    for i in range(rows.shape[0]):
        r = rows[i]
        t = row_tick[r]
        if t == CLAIMED:
            starts[i] = REPEAT
            behind += 1
        elif t < now:
            starts[i] = t
            row_tick[r] = CLAIMED
            behind += 1
        else:
            starts[i] = CURRENT
    return starts, coefficients(starts, now, blocks, offsets, recent), behind


@njit(nogil=True, inline="always")
def catch_up_one(weight, momentum, row_tick, rows, starts, now, coef, i):
    if starts[i] >= 0:
        advance_row(weight[rows[i]], momentum[rows[i]], coef, i)
        row_tick[rows[i]] = now


def catch_up_rows_serial(weight, momentum, row_tick, rows, now, blocks, offsets, recent):
    """Catch ``rows`` (repeats allowed) up to tick ``now`` in place; returns how many were behind."""
    starts, coef, behind = claim_stale_rows(row_tick, rows, now, blocks, offsets, recent)
    for i in range(rows.shape[0]):
        catch_up_one(weight, momentum, row_tick, rows, starts, now, coef, i)
    return behind


def catch_up_rows_parallel(weight, momentum, row_tick, rows, now, blocks, offsets, recent):
    """:func:`catch_up_rows_serial` with its per-row loop over numba's threads."""
    starts, coef, behind = claim_stale_rows(row_tick, rows, now, blocks, offsets, recent)
    for i in prange(rows.shape[0]):
        catch_up_one(weight, momentum, row_tick, rows, starts, now, coef, i)
    return behind


@njit(nogil=True, inline="always")
def catch_up_at(weight, momentum, row_tick, first, now, coef, i):
    """Row ``first + i`` of a range to tick ``now``, if it is behind."""
    r = first + i
    if row_tick[r] < now:
        advance_row(weight[r], momentum[r], coef, i)
        row_tick[r] = now


def catch_up_range_serial(weight, momentum, row_tick, start, stop, now, blocks, offsets, recent):
    """Catch the contiguous rows ``start..stop-1`` up to tick ``now``."""
    coef = coefficients(row_tick[start:stop], now, blocks, offsets, recent)
    for i in range(stop - start):
        catch_up_at(weight, momentum, row_tick, start, now, coef, i)


def catch_up_range_parallel(weight, momentum, row_tick, start, stop, now, blocks, offsets, recent):
    """:func:`catch_up_range_serial` over numba's threads."""
    coef = coefficients(row_tick[start:stop], now, blocks, offsets, recent)
    for i in prange(stop - start):
        catch_up_at(weight, momentum, row_tick, start, now, coef, i)


# --------------------------------------------------------------------------- push


@njit(nogil=True, inline="always")
def sgd_one(weight, momentum, rows, grads, lr, mu, wd, row_tick, starts, now, coef, i):
    """Row ``rows[i]``: caught up to ``now`` where it is behind, then torch's SGD step with
    ``grads[i]``, the numpy path's float32 operations in its order."""
    w_row, b_row, g_row = weight[rows[i]], momentum[rows[i]], grads[i]
    if 0 <= starts[i] < now:
        advance_row(w_row, b_row, coef, i)
        row_tick[rows[i]] = now
    if wd != 0:
        for d in range(w_row.shape[0]):
            b = b_row[d] * mu + (w_row[d] * wd + g_row[d])
            w_row[d] = w_row[d] - b * lr
            b_row[d] = b
    else:
        for d in range(w_row.shape[0]):
            b = b_row[d] * mu + g_row[d]
            w_row[d] = w_row[d] - b * lr
            b_row[d] = b


@njit(nogil=True)
def push_ticks_and_coefficients(row_tick, rows, now, blocks, offsets, recent, catch):
    """:func:`ticks_and_coefficients` of a push's rows; without ``catch`` (lazy rule) every row current."""
    if catch:
        return ticks_and_coefficients(row_tick, rows, now, blocks, offsets, recent)
    starts = np.full(rows.shape[0], CURRENT, np.int64)
    return starts, coefficients(starts, now, blocks, offsets, recent)


def sgd_rows_serial(weight, momentum, rows, grads, lr, mu, wd, row_tick, now, blocks, offsets, recent, catch):
    """SGD on unique ``rows`` (``catch``: each first caught up to tick ``now``), in place."""
    starts, coef = push_ticks_and_coefficients(row_tick, rows, now, blocks, offsets, recent, catch)
    for i in range(rows.shape[0]):
        sgd_one(weight, momentum, rows, grads, lr, mu, wd, row_tick, starts, now, coef, i)


def sgd_rows_parallel(weight, momentum, rows, grads, lr, mu, wd, row_tick, now, blocks, offsets, recent, catch):
    """:func:`sgd_rows_serial` over numba's threads (the rows are unique, so no two threads share one)."""
    starts, coef = push_ticks_and_coefficients(row_tick, rows, now, blocks, offsets, recent, catch)
    for i in prange(rows.shape[0]):
        sgd_one(weight, momentum, rows, grads, lr, mu, wd, row_tick, starts, now, coef, i)


#: the kernels :func:`compile_kernels` builds: name -> (Python function, parallel)
KERNELS = {
    "read_rows_serial": (read_rows_serial, False),
    "read_rows_parallel": (read_rows_parallel, True),
    "catch_up_rows_serial": (catch_up_rows_serial, False),
    "catch_up_rows_parallel": (catch_up_rows_parallel, True),
    "catch_up_range_serial": (catch_up_range_serial, False),
    "catch_up_range_parallel": (catch_up_range_parallel, True),
    "sgd_rows_serial": (sgd_rows_serial, False),
    "sgd_rows_parallel": (sgd_rows_parallel, True),
}


def compile_kernels(cache: bool) -> dict:
    """The jitted kernels by name (compiled lazily at their first call; ``cache``: kept on disk
    by numba, next to this module or in NUMBA_CACHE_DIR). Raises RuntimeError when ``cache`` is
    asked and numba finds nowhere writable to keep it."""
    return {name: njit(parallel=parallel, cache=cache, nogil=True, fastmath=False)(fn)
            for name, (fn, parallel) in KERNELS.items()}
