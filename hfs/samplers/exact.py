"""Exact nearest classes by chunked matmul + top-k in torch: the quality ceiling.

On a CPU this costs a full pass over the matrix per batch (seconds at 1M classes); on a
GPU it is fast enough to need no approximate index at all. Its "index" is a copy of the
matrix — C x D float32 in the trainer (or on its GPU) by nature: it is the brute-force
ceiling, not a sampler for a memory-bound trainer — so changed rows are written in place (``update_cost = "cheap"``) and it never
goes stale for rows the trainer has observed.
"""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np

from hfs.samplers.base import ClassSampler, empty_answer, normalise_rows
from hfs.samplers.registry import SAMPLERS
from hfs.utils.device import resolve_device


@SAMPLERS.register("exact")
class ExactSampler(ClassSampler):
    """Brute-force top-k over row chunks (bounded memory: B x chunk scores at a time)."""

    name = "exact"
    update_cost = "cheap"
    fresh_scores = True
    query_knobs = {"exact_chunk": "chunk"}

    def __init__(self, metric: str = "cosine", chunk: int = 65536, device: str = "auto") -> None:
        self.metric, self.chunk, self.device = metric, chunk, device
        self._matrix = None

    def spec(self) -> dict[str, Any]:
        return {"metric": self.metric, "chunk": self.chunk, "device": self.device}

    def _prepare(self, values: np.ndarray) -> np.ndarray:
        values = np.asarray(values, dtype=np.float32)
        return normalise_rows(values) if self.metric == "cosine" else values

    def rebuild(self, chunks: Iterable[tuple[int, np.ndarray]], num_rows: int, dim: int) -> None:
        import torch

        matrix = torch.empty((num_rows, dim), dtype=torch.float32, device=resolve_device(self.device, "config key 'sampler.exact_device'"))
        for start, rows in chunks:
            matrix[start:start + len(rows)] = torch.from_numpy(np.ascontiguousarray(self._prepare(rows)))
        self._matrix = matrix

    def scores_topk(self, features: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(B, k) best similarities and their class ids (ids -1 where k exceeds the class count)."""
        import torch

        query = torch.from_numpy(np.ascontiguousarray(self._prepare(features))).to(self._matrix.device)
        best_v = torch.full((len(features), 0), float("-inf"), device=query.device)
        best_i = torch.empty((len(features), 0), dtype=torch.int64, device=query.device)
        with torch.no_grad():
            for start in range(0, self._matrix.shape[0], self.chunk):
                scores = query @ self._matrix[start:start + self.chunk].T
                v, i = scores.topk(min(k, scores.shape[1]), dim=1)
                both_v, both_i = torch.cat([best_v, v], 1), torch.cat([best_i, i + start], 1)
                best_v, pick = both_v.topk(min(k, both_v.shape[1]), dim=1)
                best_i = both_i.gather(1, pick)
        ids = np.full((len(features), k), -1, dtype=np.int64)
        vals = np.full((len(features), k), -np.inf, dtype=np.float32)
        ids[:, :best_i.shape[1]] = best_i.cpu().numpy()
        vals[:, :best_v.shape[1]] = best_v.cpu().numpy()
        return vals, ids

    def search(self, features: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if self._matrix is None or k == 0:
            return empty_answer(len(features), k)
        scores, ids = self.scores_topk(features, k)
        return ids, scores

    def indexed_rows(self, rows: np.ndarray) -> np.ndarray | None:
        """Rows of its own copy (normalised for cosine)."""
        import torch

        if self._matrix is None:
            return None
        index = torch.from_numpy(np.asarray(rows, dtype=np.int64)).to(self._matrix.device)
        return self._matrix[index].cpu().numpy()

    def update_rows(self, rows: np.ndarray, values: np.ndarray) -> bool:
        import torch

        if self._matrix is None:
            return False
        index = torch.from_numpy(np.asarray(rows, dtype=np.int64)).to(self._matrix.device)
        self._matrix[index] = torch.from_numpy(np.ascontiguousarray(self._prepare(values))).to(self._matrix.device)
        return True

    def close(self) -> None:
        self._matrix = None
