"""The hashing forest of HF-softmax: an Annoy forest of random-projection trees.

Annoy only takes items one ``add_item`` call at a time, and that loop holds the GIL, so the
refresh machinery builds this index in a child process from a snapshot file and loads the
result with ``mmap`` (instant, shared page cache). ``angular`` serves cosine, ``dot`` the
inner product.

Queries are one ``get_nns_by_vector`` call per feature, but annoy releases the GIL inside
each call, so a batch is split over ``query_threads`` threads: 1.3-1.9x faster in isolated
tests on 2 idle cores, though no gain showed inside ``hfs bench-sampler`` at 1M rows.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from hfs.samplers.base import ClassSampler, empty_answer
from hfs.samplers.registry import SAMPLERS
from hfs.utils.optional import require



@SAMPLERS.register("annoy")
class AnnoySampler(ClassSampler):
    """Random-projection forest; more trees / larger search_k = better recall, slower."""

    name = "annoy"
    update_cost = "none"
    build_in_subprocess = True
    query_knobs = {"annoy_search_k": "search_k", "query_threads": "query_threads"}

    def __init__(self, metric: str = "cosine", trees: int = 16, search_k: int = -1, seed: int = 0,
                 build_threads: int = 1, query_threads: int = -1) -> None:
        self.metric, self.trees, self.search_k, self.seed, self.build_threads = metric, trees, search_k, seed, build_threads
        self.query_threads = query_threads
        self._index = None
        self._pool: ThreadPoolExecutor | None = None
        self._pool_size = 0

    def spec(self) -> dict[str, Any]:
        return {"metric": self.metric, "trees": self.trees, "search_k": self.search_k, "seed": self.seed,
                "build_threads": self.build_threads, "query_threads": self.query_threads}

    def _threads(self) -> int:
        """Query threads: ``query_threads``, or every core this process may run on when -1."""
        if self.query_threads > 0:
            return self.query_threads
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)

    def _empty_index(self, dim: int):
        index = require("annoy", "sampler 'annoy'", "pip install annoy", "or pick sampler.type=hnsw/exact/random").AnnoyIndex(dim, "angular" if self.metric == "cosine" else "dot")
        index.set_seed(self.seed)
        return index

    def rebuild(self, chunks: Iterable[tuple[int, np.ndarray]], num_rows: int, dim: int) -> None:
        index = self._empty_index(dim)
        for start, rows in chunks:
            for offset, row in enumerate(np.asarray(rows, dtype=np.float32).tolist()):
                index.add_item(start + offset, row)
        index.build(self.trees, n_jobs=self.build_threads)
        self.close()
        self._index = index

    def search(self, features: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """annoy answers angular distances d = sqrt(2 - 2 cos) (cosine = 1 - d^2 / 2) or, for
        ``dot``, the dot products themselves."""
        out, sims = empty_answer(len(features), k)
        if self._index is None or k == 0:
            return out, sims
        search_k = self.search_k if self.search_k > 0 else -1
        query = self._index.get_nns_by_vector
        vectors = np.asarray(features, dtype=np.float32).tolist()
        cosine = self.metric == "cosine"

        def answer(first: int, last: int) -> None:
            for i in range(first, last):
                ids, dist = query(vectors[i], k, search_k, include_distances=True)
                out[i, :len(ids)] = ids
                dist = np.asarray(dist, dtype=np.float32)
                sims[i, :len(ids)] = 1.0 - 0.5 * dist * dist if cosine else dist

        threads = min(self._threads(), len(vectors))
        if threads <= 1:
            answer(0, len(vectors))
            return out, sims
        if self._pool is None or self._pool_size != threads:
            self._shutdown_pool()
            self._pool, self._pool_size = ThreadPoolExecutor(threads, thread_name_prefix="hfs-annoy-query"), threads
        bounds = np.linspace(0, len(vectors), threads + 1).astype(int)
        for done in [self._pool.submit(answer, int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]:
            done.result()
        return out, sims

    def indexed_rows(self, rows: np.ndarray) -> np.ndarray | None:
        """Annoy keeps the raw vectors (angular normalises at query time)."""
        if self._index is None:
            return None
        get = self._index.get_item_vector
        return np.array([get(int(r)) for r in rows], dtype=np.float32).reshape(len(rows), -1)

    def save(self, path: Path) -> None:
        self._index.save(str(path))

    def load(self, path: Path, num_rows: int, dim: int) -> None:
        index = self._empty_index(dim)
        index.load(str(path))
        self.close()
        self._index = index

    def _shutdown_pool(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def close(self) -> None:
        self._shutdown_pool()
        if self._index is not None:
            self._index.unload()
            self._index = None
