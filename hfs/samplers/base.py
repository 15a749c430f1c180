"""The ClassSampler seam: samplers differ only in their index.

``rebuild`` indexes the classifier rows; ``candidates`` returns, per query feature, the ids
of the ``k`` most similar rows (-1 where it found fewer). Turning labels + candidates into
exactly ``sample_num`` active classes is one shared function (``selection.py``), and the
refresh schedule (when and where rebuilds run) lives once too (``refresh.py``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Iterable

import numpy as np


class ClassSampler(ABC):
    """An index over classifier rows answering nearest-class queries."""

    #: cosine or dot; set at construction from the config's resolved metric.
    metric: str = "cosine"

    @abstractmethod
    def rebuild(self, chunks: Iterable[tuple[int, np.ndarray]], num_rows: int, dim: int) -> None:
        """(Re)build the index from the whole matrix, given as (first_row, rows) chunks."""

    @abstractmethod
    def candidates(self, features: np.ndarray, k: int) -> np.ndarray:
        """(B, k) int64 class ids, most similar first; -1 pads where fewer were found."""

    def update_rows(self, rows: np.ndarray, values: np.ndarray) -> bool:
        """Update changed rows in place when the index allows; False means a rebuild is needed."""
        return False
