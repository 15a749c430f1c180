"""Shared pieces of the served-path tests (shared memory, pipelined pushes): a catchup store to
serve, a client of it, and an exact index spec that builds in the foreground."""

from __future__ import annotations

from hfs.paramserver.base import HParams
from hfs.paramserver.sharding import ShardSpec
from hfs.paramserver.store import InProcessStore
from hfs.samplers.owned import IndexSpec

EXACT = IndexSpec(sampler="exact", kwargs={"metric": "cosine", "chunk": 64, "device": "cpu"}, background=False,
                  refresh="interval")


def catchup_store(rows: int, dim: int, shard: ShardSpec = ShardSpec()) -> InProcessStore:
    """A store holding matrix ``fc`` (rows x dim, catchup rule, lr 0.3, momentum 0.9, decay 1e-3)."""
    store = InProcessStore(None, timeout_s=10, shard=shard)
    store.create("fc", rows, dim, init="gaussian", std=0.5, seed=4, update_rule="catchup")
    store.set_hparams("fc", HParams(0.3, 0.9, 1e-3))
    return store


def served_client(address, *, mode: str = "auto", pipeline: bool = True, timeout_s: float = 10.0):
    """A ParamClient of ``address`` with the given shared-memory mode and push pipelining."""
    from hfs.paramserver.client import ParamClient

    return ParamClient(address, timeout_s=timeout_s, shared_memory=mode, pipeline_pushes=pipeline)


def select_into(client, rng, step: int, rows, seen: list, *, batch: int, dim: int, classes: int):
    """One ``select`` of random features and labels (S = 30, k = 5): its arrays are appended to
    ``seen``; returns ``rows`` with the active classes added (what the step then pushes)."""
    import numpy as np

    from hfs.samplers.selection import SelectionRule

    features = rng.standard_normal((batch, dim)).astype(np.float32)
    labels = rng.integers(0, classes, batch).astype(np.int64)
    chosen, values = client.select("fc", features, labels, step, SelectionRule(30, seed=1), 5)
    seen += [chosen.active, chosen.local, values]
    return np.union1d(rows, chosen.active)
