"""Reusable work arrays for the store's per-request row maths.

A get or push of 1,000 rows x 256 float32 makes four or five 1 MB temporaries (gathered
weights and momentum, products). Fresh 1 MB arrays come from the allocator as fresh pages:
glibc returns freed memory above its trim threshold to the OS, so every request faulted its
temporaries in again (~950 minor page faults per get+push, measured; more than half the
in-process step's time). Reusing a few arrays per matrix makes a steady-state request fault
nothing. Only requests up to ``MAX_SCRATCH_BYTES`` per array are served from scratch (bigger
ones allocate as before), so the memory kept is bounded: slots x 16 MiB per matrix at most.
"""

from __future__ import annotations

import numpy as np

#: Largest work array kept between requests (bytes); bigger requests use fresh arrays.
MAX_SCRATCH_BYTES = 16 << 20


class Scratch:
    """Numbered float32 work arrays of shape (n, dim), grown on demand and reused.

    Not thread-safe: the store uses it under its lock. A view handed out is valid until
    the same slot is asked for again.
    """

    def __init__(self) -> None:
        self._slots: dict[int, np.ndarray] = {}

    def get(self, slot: int, n: int, dim: int) -> np.ndarray:
        """A (n, dim) float32 array to overwrite: slot ``slot``'s buffer, or a fresh one if too big."""
        if n * dim * 4 > MAX_SCRATCH_BYTES:
            return np.empty((n, dim), dtype=np.float32)
        buf = self._slots.get(slot)
        if buf is None or buf.shape[1] != dim or buf.shape[0] < n:
            grown = 2 * buf.shape[0] if buf is not None and buf.shape[1] == dim else n
            rows = min(max(n, grown), MAX_SCRATCH_BYTES // (4 * dim))  # >= n: n fits under the cap
            buf = self._slots[slot] = np.empty((rows, dim), dtype=np.float32)
        return buf[:n]

    @property
    def nbytes(self) -> int:
        return int(sum(b.nbytes for b in self._slots.values()))


def take_rows(matrix: np.ndarray, rows: np.ndarray, out: np.ndarray) -> np.ndarray:
    """``matrix[rows]`` into ``out`` without a temporary (``rows`` already checked to lie in range)."""
    return np.take(matrix, rows, axis=0, out=out, mode="clip")
