"""Scratch: work arrays reused between requests, bounded in size."""

import numpy as np

from hfs.paramserver.scratch import MAX_SCRATCH_BYTES, Scratch, take_rows


def test_slots_are_reused_and_grow():
    scratch = Scratch()
    first = scratch.get(0, 10, 4)
    again = scratch.get(0, 8, 4)
    assert again.shape == (8, 4) and np.shares_memory(first, again)  # no new memory for a smaller request
    assert not np.shares_memory(first, scratch.get(1, 10, 4))  # slots are distinct
    bigger = scratch.get(0, 30, 4)
    assert bigger.shape == (30, 4) and not np.shares_memory(first, bigger)
    assert scratch.nbytes == (30 + 10) * 4 * 4


def test_requests_over_the_cap_get_fresh_arrays():
    scratch = Scratch()
    dim = 1024
    rows = MAX_SCRATCH_BYTES // (4 * dim) + 1
    a, b = scratch.get(0, rows, dim), scratch.get(0, rows, dim)
    assert a.shape == (rows, dim) and not np.shares_memory(a, b)
    assert scratch.nbytes == 0  # nothing kept


def test_take_rows_fills_out():
    matrix = np.arange(20, dtype=np.float32).reshape(5, 4)
    out = np.empty((3, 4), np.float32)
    assert take_rows(matrix, np.array([4, 0, 4]), out) is out
    np.testing.assert_array_equal(out, matrix[[4, 0, 4]])
