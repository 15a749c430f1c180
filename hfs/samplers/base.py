"""The ClassSampler seam: samplers differ only in their index.

``rebuild`` indexes the classifier rows; ``candidates`` returns, per query feature, the ids
of the ``k`` most similar rows (-1 where it found fewer). Turning labels + candidates into
exactly ``sample_num`` active classes is one shared function (``selection.py``), and the
refresh schedule (when and where rebuilds run) lives once too (``refresh.py``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np


def array_chunks(matrix: np.ndarray, chunk_rows: int = 65536) -> Iterator[tuple[int, np.ndarray]]:
    """(first_row, rows) views of an in-memory matrix, the shape ``rebuild`` consumes."""
    for start in range(0, matrix.shape[0], chunk_rows):
        yield start, matrix[start:start + chunk_rows]


def empty_answer(queries: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The answer of an index that found nothing: ids -1, similarities -inf."""
    return np.full((queries, k), -1, dtype=np.int64), np.full((queries, k), -np.inf, dtype=np.float32)


def normalise_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows stay zero): cosine similarity as a dot product."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32, copy=False)


class ClassSampler(ABC):
    """An index over classifier rows answering nearest-class queries.

    Class attributes tell the refresh machinery what the index can do:
    ``update_cost`` is ``"none"`` (rows cannot change in place: rebuild), ``"cheap"``
    (in-place row writes cost about a memcpy: apply every observed row) or ``"costly"``
    (in place but each row costs like an insertion: apply only rows that moved a lot,
    within a per-step budget). ``build_in_subprocess`` marks indexes whose build holds the
    GIL (annoy's per-item ``add_item`` loop); those are built by a child process from a
    snapshot file and must implement ``save``/``load``.
    """

    #: registry name, set by each implementation.
    name: str = ""
    #: cosine or dot; set at construction from the config's resolved metric.
    metric: str = "cosine"
    update_cost: str = "none"
    build_in_subprocess: bool = False
    #: False for samplers with no index to build or refresh (random, a memory that learns as it goes).
    needs_index: bool = True
    #: False for samplers that never answer candidates (random): their holder keeps no index at all.
    has_candidates: bool = True
    #: rows a ``costly`` sampler moves in place per step when ``sampler.update_budget`` is -1 (auto)
    default_update_budget: int = 16
    #: True when ``search`` answers similarities under the rows as they are now (an index updated in
    #: place with every changed row, a memory that scores through its holder); False: the holder
    #: re-scores candidates when the selection rule compares them (``SelectionRule.compares_candidates``).
    fresh_scores: bool = False
    #: ``sampler`` config keys that change only how queries run, mapped to the attribute they
    #: set: a built index answers with a new value at once (``hfs bench-sampler --query-sweep``).
    query_knobs: dict[str, str] = {}

    @abstractmethod
    def rebuild(self, chunks: Iterable[tuple[int, np.ndarray]], num_rows: int, dim: int) -> None:
        """(Re)build the index from the whole matrix, given as (first_row, rows) chunks."""

    @abstractmethod
    def search(self, features: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(B, k) int64 class ids, most similar first (-1 pads where fewer were found), and
        (B, k) float32 similarities (-inf on the pads).

        Similarities are comparable across samplers and across indexes of disjoint row sets
        (shards): the cosine of query and row for the cosine metric, their dot product for
        ``dot``. Shards merge their answers by it and selection rules may weigh by it.
        """

    def candidates(self, features: np.ndarray, k: int) -> np.ndarray:
        """(B, k) int64 class ids, most similar first; -1 pads where fewer were found."""
        return self.search(features, k)[0]

    @abstractmethod
    def spec(self) -> dict[str, Any]:
        """Constructor keyword arguments: an identical, empty sampler is ``type(self)(**spec())``."""

    def indexed_rows(self, rows: np.ndarray) -> np.ndarray | None:
        """(len(rows), D) float32: the vectors the index holds for class ids ``rows``, as it stores them.

        Drift is measured against these, so the trainer keeps no copy of the matrix. None
        when there is no index (yet).
        """
        return None

    def update_rows(self, rows: np.ndarray, values: np.ndarray) -> bool:
        """Update changed rows in place when the index allows; False means a rebuild is needed."""
        return False

    def save(self, path: Path) -> None:
        """Write the built index to ``path`` (only samplers built in a subprocess need this)."""
        raise NotImplementedError(f"sampler '{self.name}' cannot be saved")

    def load(self, path: Path, num_rows: int, dim: int) -> None:
        """Read an index written by ``save`` (only samplers built in a subprocess need this)."""
        raise NotImplementedError(f"sampler '{self.name}' cannot be loaded")

    def close(self) -> None:
        """Release the index's memory/mappings. Idempotent."""
