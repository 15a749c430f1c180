"""Positives + uniform negatives, no index: the rule Partial FC uses.

Its candidates are always empty, so the shared selection rule fills the whole active set
beyond the batch's labels uniformly at random. It is the baseline every index must beat
on softmax-mass coverage, and it has no upkeep at all.
"""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np

from hfs.samplers.base import ClassSampler, empty_answer
from hfs.samplers.registry import SAMPLERS


@SAMPLERS.register("random")
class RandomSampler(ClassSampler):
    """No index: zero build, zero upkeep, zero hard negatives."""

    name = "random"
    needs_index = False
    has_candidates = False

    def __init__(self, metric: str = "cosine") -> None:
        self.metric = metric

    def spec(self) -> dict[str, Any]:
        return {"metric": self.metric}

    def rebuild(self, chunks: Iterable[tuple[int, np.ndarray]], num_rows: int, dim: int) -> None:
        """Nothing to index."""

    def search(self, features: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return empty_answer(len(features), 0)
