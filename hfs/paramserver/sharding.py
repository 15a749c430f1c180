"""How a matrix's rows are split between shards: the one row-split formula.

Shard i of N owns rows ``[C*i//N, C*(i+1)//N)``: contiguous ranges whose sizes differ by at
most one. The weight store's shards, the ZeroMQ client that routes rows to them and the
sharded classifier's ranks all split by this formula, so one matrix split any of these ways
has the same rows in the same places.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hfs.paramserver.base import StoreError


def row_bounds(num_rows: int, count: int) -> np.ndarray:
    """Row boundaries of ``count`` shards of ``num_rows`` rows: shard i owns [bounds[i], bounds[i+1])."""
    return np.array([num_rows * i // count for i in range(count + 1)], dtype=np.int64)


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
        return row_bounds(num_rows, self.count)

    def row_range(self, num_rows: int) -> tuple[int, int]:
        """Rows [start, end) of this shard."""
        b = self.bounds(num_rows)
        return int(b[self.index]), int(b[self.index + 1])
