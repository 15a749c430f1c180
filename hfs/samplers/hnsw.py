"""HNSW graph index (hnswlib): high recall at low query cost, and rows can change in place.

hnswlib releases the GIL in ``add_items`` and ``knn_query``, so a background rebuild runs
in a thread. A row that moved is updated in place by ``mark_deleted`` on its old element
and a fresh insertion under a new hnsw label (mapped back to the class id): about 4x
cheaper here than re-adding the same label, which makes hnswlib repair every neighbour's
links (``updatePoint``). The deleted element stays in the graph as a routing node until
the next rebuild. hnswlib is not safe for queries concurrent with insertions, so updates
run in the training thread, within a per-step budget: ``update_cost = "costly"``.
"""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np

from hfs.samplers.base import ClassSampler, empty_answer
from hfs.samplers.registry import SAMPLERS
from hfs.utils.optional import require



@SAMPLERS.register("hnsw")
class HnswSampler(ClassSampler):
    """Navigable small-world graph; M and ef_construction set build cost, ef query cost."""

    name = "hnsw"
    update_cost = "costly"
    query_knobs = {"hnsw_ef": "ef", "query_threads": "query_threads"}

    def __init__(self, metric: str = "cosine", m: int = 16, ef_construction: int = 100, ef: int = 16,
                 seed: int = 0, build_threads: int = 1, query_threads: int = -1) -> None:
        self.metric, self.m, self.ef_construction, self.ef = metric, m, ef_construction, ef
        self.seed, self.build_threads, self.query_threads = seed, build_threads, query_threads
        self._index = None
        self._count = 0
        self._class_of = np.empty(0, dtype=np.int64)  # hnsw label -> class id
        self._label_of = np.empty(0, dtype=np.int64)  # class id -> its live hnsw label
        self._next_label = 0

    def spec(self) -> dict[str, Any]:
        return {"metric": self.metric, "m": self.m, "ef_construction": self.ef_construction, "ef": self.ef,
                "seed": self.seed, "build_threads": self.build_threads, "query_threads": self.query_threads}

    def rebuild(self, chunks: Iterable[tuple[int, np.ndarray]], num_rows: int, dim: int) -> None:
        index = require("hnswlib", "sampler 'hnsw'", "pip install hnswlib", "or pick sampler.type=annoy/exact/random").Index(space="cosine" if self.metric == "cosine" else "ip", dim=dim)
        index.init_index(max_elements=num_rows, M=self.m, ef_construction=self.ef_construction, random_seed=self.seed)
        for start, rows in chunks:
            rows = np.ascontiguousarray(rows, dtype=np.float32)
            index.add_items(rows, np.arange(start, start + len(rows)), num_threads=self.build_threads)
        index.set_ef(self.ef)
        self._index, self._count = index, num_rows
        self._class_of = np.arange(num_rows, dtype=np.int64)
        self._label_of = np.arange(num_rows, dtype=np.int64)
        self._next_label = num_rows

    def search(self, features: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """hnswlib answers distances 1 - cos (cosine space) or 1 - dot (ip space): similarity = 1 - d."""
        ids, sims = empty_answer(len(features), k)
        if self._index is None or k == 0 or len(features) == 0:
            return ids, sims
        kk = min(k, self._count)
        self._index.set_ef(max(self.ef, kk))
        labels, dist = self._index.knn_query(np.ascontiguousarray(features, dtype=np.float32), k=kk,
                                             num_threads=self.query_threads)
        ids[:, :kk] = self._class_of[labels.astype(np.int64)]
        sims[:, :kk] = 1.0 - dist
        return ids, sims

    def indexed_rows(self, rows: np.ndarray) -> np.ndarray | None:
        """The live element of each class; hnswlib's cosine space stores them normalised."""
        if self._index is None:
            return None
        labels = self._label_of[np.asarray(rows, dtype=np.int64)]
        return np.asarray(self._index.get_items(labels), dtype=np.float32).reshape(len(labels), -1)

    def update_rows(self, rows: np.ndarray, values: np.ndarray) -> bool:
        if self._index is None:
            return False
        rows = np.asarray(rows, dtype=np.int64)
        if not len(rows):
            return True
        new_labels = np.arange(self._next_label, self._next_label + len(rows), dtype=np.int64)
        if new_labels[-1] >= self._index.get_max_elements():
            grow = max(1024, self._count // 20, len(rows))
            self._index.resize_index(self._index.get_max_elements() + grow)
            self._class_of = np.concatenate([self._class_of, np.full(grow, -1, dtype=np.int64)])
        for label in self._label_of[rows]:
            self._index.mark_deleted(int(label))
        # in the training thread, which waits for it: all query threads, not the background build's
        self._index.add_items(np.ascontiguousarray(values, dtype=np.float32), new_labels, num_threads=self.query_threads)
        self._class_of[new_labels] = rows
        self._label_of[rows] = new_labels
        self._next_label += len(rows)
        return True

    def close(self) -> None:
        self._index = None
