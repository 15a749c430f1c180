"""The WeightStore seam: what the classifier needs from wherever the big matrix lives.

The in-process store (`store.py`) and the ZeroMQ client (`client.py`) both implement this
interface, so the trainer never knows which one it has. Rows are int64 numpy arrays,
values float32 numpy arrays of shape (len(rows), dim).
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence

import numpy as np


@dataclass(frozen=True)
class HParams:
    """Optimizer hyper-parameters the trainer pushes to the store (its lr schedule)."""

    lr: float
    momentum: float = 0.9
    weight_decay: float = 0.0


@dataclass(frozen=True)
class ReaderSpec:
    """How another thread or process opens a client of its own to the same store.

    Everything a client needs, taken from the store the trainer holds (one place: never a
    joined address string or a secret resolved again): every shard's endpoint, the request
    and connect timeouts (``paramserver.timeout_s``, ``paramserver.connect_timeout_s``) and
    the shared secret. A child process gets :meth:`public` on its command line and the
    secret through :meth:`child_env` (``HFS_PS_SECRET``), never argv.
    """

    endpoints: tuple[str, ...]
    timeout_s: float = 60.0
    connect_timeout_s: float = 10.0
    secret: bytes | None = field(default=None, repr=False)

    def public(self) -> dict[str, Any]:
        """Everything but the secret, JSON-able."""
        return {"endpoints": list(self.endpoints), "timeout_s": self.timeout_s,
                "connect_timeout_s": self.connect_timeout_s}

    def child_env(self) -> dict[str, str]:
        """Environment entries that carry the secret to a child process."""
        from hfs.paramserver import SECRET_ENV

        return {SECRET_ENV: self.secret.decode()} if self.secret else {}

    @classmethod
    def from_child(cls, public: Mapping[str, Any], environ: Mapping[str, str] = os.environ) -> "ReaderSpec":
        """The spec a parent passed as :meth:`public` + :meth:`child_env`."""
        from hfs.paramserver import SECRET_ENV

        secret = environ.get(SECRET_ENV, "")
        return cls(tuple(public["endpoints"]), float(public["timeout_s"]), float(public["connect_timeout_s"]),
                   secret.encode() if secret else None)

    def open(self) -> "WeightStore":
        """A fresh client of the store (the caller closes it)."""
        from hfs.paramserver.client import ParamClient

        return ParamClient(self.endpoints, timeout_s=self.timeout_s, connect_timeout_s=self.connect_timeout_s,
                           secret=self.secret)


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

    @abstractmethod
    def set_hparams(self, name: str, hparams: HParams) -> None:
        """Learning rate, momentum and weight decay for the next applied steps."""

    @abstractmethod
    def iter_chunks(self, name: str, chunk_rows: int = 65536) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (first_row, rows) chunks of the whole matrix, for index rebuilds and evaluation."""

    def reader_spec(self) -> ReaderSpec | None:
        """How a build in another thread or process reads these matrices with a client of its
        own; None when only this object can read them (the in-process store: it is not
        thread-safe, so its rows reach a build through the training thread)."""
        return None

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
