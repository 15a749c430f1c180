"""The WeightStore seam: what the classifier needs from wherever the big matrix lives.

The in-process store (`store.py`) and the ZeroMQ client (`client.py`) both implement this
interface, so the trainer never knows which one it has. Rows are int64 numpy arrays,
values float32 numpy arrays of shape (len(rows), dim).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np

from hfs.utils.errors import HfsError
from hfs.utils.typed import rules


class StoreError(HfsError):
    """A request the store refuses (unknown matrix, row out of range, wrong shape, ...)."""


@dataclass(frozen=True)
class HParams:
    """Optimizer hyper-parameters the trainer pushes to the store (its lr schedule); the store
    holds them to these rules (finite, >= 0)."""

    lr: float = field(metadata=rules(ge=0.0))
    momentum: float = field(default=0.9, metadata=rules(ge=0.0))
    weight_decay: float = field(default=0.0, metadata=rules(ge=0.0))


class WeightStore(ABC):
    """Named row-matrices with sparse SGD (momentum + weight decay) applied on push."""

    # -- workers (synchronous steps) -------------------------------------------------
    def register(self, worker: str) -> None:  # pragma: no cover - default for single worker
        """Join the set of workers whose pushes make up a synchronous step."""

    def leave(self, worker: str) -> None:  # pragma: no cover - default for single worker
        """Leave the set of workers; pending steps stop waiting for this one."""

    # -- matrices --------------------------------------------------------------------
    @abstractmethod
    def create(self, name: str, num_rows: int, dim: int, *, init: str = "gaussian", std: float = 0.01,
               seed: int = 0, exist_ok: bool = False, update_rule: str | None = None) -> None:
        """Create a float32 matrix (and its momentum). With exist_ok, keep an existing one of that shape.

        ``update_rule`` (catchup | lazy | dense; None = the store's default, catchup) says how the
        rows a step does not touch move; an existing matrix switches to a rule given here.
        """

    @abstractmethod
    def shape(self, name: str) -> tuple[int, int]:
        """(num_rows, dim) of a matrix."""

    @abstractmethod
    def last_applied(self, name: str) -> int:
        """The last step applied to a matrix (-1: never trained). A fresh run must find -1."""

    @abstractmethod
    def get_rows(self, name: str, rows: np.ndarray, step: int | None = None) -> np.ndarray:
        """Rows' current values. With ``step``, wait until every step before it is applied."""

    @abstractmethod
    def set_rows(self, name: str, rows: np.ndarray, values: np.ndarray) -> None:
        """Overwrite rows (momentum kept, brought to the current step under the catchup rule)."""

    @abstractmethod
    def push_grads(self, name: str, rows: np.ndarray, grads: np.ndarray, step: int, *,
                   worker: str | None = None) -> None:
        """Add this worker's row gradients to ``step``; the step is applied once all workers pushed.

        Duplicate rows, within and across pushes, add up. Applied with the SGD rule of
        ``torch.optim.SGD``; the matrix's update rule says what the untouched rows do (catchup:
        exactly what dense SGD does to them, paid for when they are next used).
        One push per worker per step (accumulate micro-batches before pushing). ``worker``
        names the pusher when several workers share one in-process store; it may be left
        out when at most one worker is registered, and the ZeroMQ client fills it in with
        the name it registered.
        """

    @property
    def pipelines_pushes(self) -> bool:
        """True when ``push_grads`` may return before the store has answered the push (the
        ZeroMQ client's ``pipeline_pushes``): calls from the same thread still see it applied."""
        return False

    def flush(self) -> None:
        """Wait until every push this thread sent is answered; raise the first failure. A store
        whose ``push_grads`` returns only once done (the in-process one) has nothing to wait for."""

    @abstractmethod
    def set_hparams(self, name: str, hparams: HParams) -> None:
        """Learning rate, momentum and weight decay for the next applied steps."""

    @abstractmethod
    def iter_chunks(self, name: str, chunk_rows: int = 65536) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (first_row, rows) chunks of the whole matrix, for index rebuilds and evaluation."""

    # -- the index over a matrix's rows (owned by the store) ----------------------------
    def attach_index(self, name: str, spec: Any) -> bool:
        """Keep an index (a ``hfs.samplers.IndexSpec``) over matrix ``name``'s rows, built and
        refreshed by the store itself. Idempotent for an equal spec (N trainers send the same:
        one index), replaced for a different one; True when a build was started. A store
        that keeps no index answers False, and ``select`` fills with uniform negatives."""
        return False

    def select(self, name: str, features: np.ndarray, labels: np.ndarray, step: int, rule: Any, k: int,
               *, with_rows: bool = True) -> tuple[Any, np.ndarray | None]:
        """The batch's active classes and, with ``with_rows``, their rows' values, for step ``step``.

        ``features`` (B, dim) float32 ask the matrix's index for ``k`` candidates each;
        ``rule`` (a ``hfs.samplers.SelectionRule``) turns labels + candidates into a
        ``Selection`` (``active``, ``local``, ``logit_adjust``). Waits like
        ``get_rows(step=step)``. This default keeps no index: uniform negatives.
        """
        chosen = rule.select(np.asarray(labels, dtype=np.int64), None, None, self.shape(name)[0], step)
        return chosen, (self.get_rows(name, chosen.active, step=step) if with_rows else None)

    def index_stats(self, name: str) -> dict:
        """The index of matrix ``name``: builds, drift, readiness, upkeep seconds ({} without one)."""
        return {}

    # -- persistence -----------------------------------------------------------------
    @abstractmethod
    def snapshot(self, tag: str | None = None) -> str:
        """Write all matrices + momentum + step + hparams; return the snapshot's name."""

    @abstractmethod
    def restore(self, tag: str = "latest") -> int:
        """Load a snapshot by name (or the latest complete one); return its step."""

    @abstractmethod
    def stats(self) -> dict:
        """Counters for logs and benchmarks (requests, bytes, latency percentiles, ...)."""

    def close(self) -> None:
        """Release sockets/threads. Idempotent."""

    def __enter__(self) -> "WeightStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
