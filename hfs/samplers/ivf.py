"""Inverted-file index (faiss IVF-Flat): the field's standard similarity search, updated in place.

The rows are clustered by k-means into ``nlist`` lists (a sample of them trains the
centroids); a query scans the ``nprobe`` lists whose centroids are nearest: about
``C x nprobe / nlist`` rows instead of C, exact within them. A row that moved is removed
and re-added under its class id, which puts it in the list of its nearest centroid now:
one centroid scan per row, so ``update_cost = "costly"`` (the holder updates the rows that
drifted most, within a per-step budget; the centroids themselves are refreshed by rebuilds).
faiss releases the GIL in training, adding and searching, so a background rebuild runs in a
thread. The index keeps its own copy of the vectors (normalised for cosine), C x D x 4 bytes.
faiss's threads follow ``build_threads`` and ``query_threads`` (-1: faiss's default, all cores).

``nlist`` 0 picks about ``sqrt(C)`` lists (1,000 at 1M; see :func:`auto_nlist`), at most one
list per 39 training rows as faiss's k-means wants. The same search runs on a GPU with
``faiss-gpu``; this sampler uses the CPU index.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import numpy as np

from hfs.samplers.base import ClassSampler, empty_answer, normalise_rows
from hfs.samplers.registry import SAMPLERS
from hfs.utils.optional import require

#: training rows per list that faiss's k-means asks for (fewer: it warns, quality drops)
ROWS_PER_LIST = 39
#: rows of a training sample, at most (k-means cost is sample x nlist x D per iteration)
MAX_TRAIN_ROWS = 256 * 1024


def auto_nlist(num_rows: int) -> int:
    """About sqrt(C) lists (1,000 at 1M), at least 1 and at most one per ``ROWS_PER_LIST`` rows.

    Fewer lists than faiss's usual 4-16 sqrt(C) for search speed: here the index is rebuilt as
    the rows move and re-adds a moved row by one centroid scan, and both cost ~nlist; a query
    then scans nprobe / nlist of the rows (0.8% at 1M with nprobe 8)."""
    return int(max(1, min(round(math.sqrt(num_rows)), num_rows // ROWS_PER_LIST)))


def _faiss():
    return require("faiss", "sampler 'ivf'", "pip install faiss-cpu", "or pick sampler.type=exact/hnsw/annoy")


@SAMPLERS.register("ivf")
class IvfSampler(ClassSampler):
    """faiss IVF-Flat over the rows; ``nlist`` lists (0: auto), ``nprobe`` of them scanned per query."""

    name = "ivf"
    update_cost = "costly"
    default_update_budget = 128  # a re-add is one centroid scan (~nlist x D), far below an hnsw insertion
    query_knobs = {"ivf_nprobe": "nprobe", "query_threads": "query_threads"}

    def __init__(self, metric: str = "cosine", nlist: int = 0, nprobe: int = 8, seed: int = 0,
                 build_threads: int = 1, query_threads: int = -1) -> None:
        if nlist < 0 or nprobe <= 0:
            raise ValueError(f"ivf needs nlist >= 0 and nprobe > 0, got {nlist}, {nprobe}")
        self.metric, self.nlist, self.nprobe, self.seed = metric, int(nlist), int(nprobe), int(seed)
        self.build_threads, self.query_threads = int(build_threads), int(query_threads)
        self._index = None
        self._num_rows = 0

    def spec(self) -> dict[str, Any]:
        return {"metric": self.metric, "nlist": self.nlist, "nprobe": self.nprobe, "seed": self.seed,
                "build_threads": self.build_threads, "query_threads": self.query_threads}

    def _prepare(self, values: np.ndarray) -> np.ndarray:
        values = np.ascontiguousarray(values, dtype=np.float32)
        return normalise_rows(values) if self.metric == "cosine" else values

    def _threads(self, faiss, threads: int) -> None:
        if threads > 0:
            faiss.omp_set_num_threads(threads)

    def rebuild(self, chunks: Iterable[tuple[int, np.ndarray]], num_rows: int, dim: int) -> None:
        """Train the centroids on a uniform sample of the rows, then add every row under its class id.

        The chunks are read once: rows go into a staging copy (what the index will hold anyway)
        and the training sample is drawn from it.
        """
        faiss = _faiss()
        self._threads(faiss, self.build_threads)
        staged = np.empty((num_rows, dim), dtype=np.float32)
        for start, rows in chunks:
            staged[start:start + len(rows)] = self._prepare(rows)
        nlist = self.nlist or auto_nlist(num_rows)
        nlist = max(1, min(nlist, num_rows))
        rng = np.random.default_rng(self.seed)
        sample = min(num_rows, max(ROWS_PER_LIST * nlist, 1), MAX_TRAIN_ROWS)
        train = staged[np.sort(rng.choice(num_rows, sample, replace=False))] if sample < num_rows else staged
        quantizer = faiss.IndexFlatIP(dim)  # cosine: inner product of normalised rows; dot: of the rows
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = self.seed
        index.train(train)
        index.set_direct_map_type(faiss.DirectMap.Hashtable)  # remove/re-add by id, read a row back
        index.add_with_ids(staged, np.arange(num_rows, dtype=np.int64))
        # the IVF index points at its quantizer without owning it: keep both alive together
        self._index, self._quantizer, self._num_rows = index, quantizer, num_rows

    def search(self, features: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        ids, sims = empty_answer(len(features), k)
        if self._index is None or k == 0 or len(features) == 0:
            return ids, sims
        faiss = _faiss()
        self._threads(faiss, self.query_threads)
        self._index.nprobe = min(self.nprobe, self._index.nlist)
        kk = min(k, self._num_rows)
        found_sims, found = self._index.search(self._prepare(features), kk)
        ids[:, :kk] = found
        sims[:, :kk] = np.where(found >= 0, found_sims, -np.inf)
        return ids, sims

    def indexed_rows(self, rows: np.ndarray) -> np.ndarray | None:
        """The vectors the lists hold (normalised for cosine), read back through the direct map."""
        if self._index is None:
            return None
        rows = np.asarray(rows, dtype=np.int64)
        if not rows.size:
            return np.empty((0, self._index.d), dtype=np.float32)
        return np.asarray(self._index.reconstruct_batch(rows), dtype=np.float32).reshape(rows.size, -1)

    def update_rows(self, rows: np.ndarray, values: np.ndarray) -> bool:
        """Remove the rows and add their new values: each lands in the list of its nearest centroid now."""
        if self._index is None:
            return False
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size:
            faiss = _faiss()
            self._threads(faiss, self.query_threads)  # the holder's thread waits for it: the query threads
            self._index.remove_ids(rows)
            self._index.add_with_ids(self._prepare(values), rows)
        return True

    def close(self) -> None:
        self._index = self._quantizer = None
