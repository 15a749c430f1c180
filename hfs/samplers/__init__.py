"""Class samplers: which classes are active in a mini-batch.

``build_selector(cfg, store, matrix, num_classes)`` is what the trainer calls; it wraps the
configured sampler (``annoy``, ``hnsw``, ``exact``, ``random``, see ``SAMPLERS``) with the
shared selection rule and the refresh policy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hfs.samplers.annoy_forest import AnnoySampler
from hfs.samplers.base import ClassSampler
from hfs.samplers.exact import ExactSampler
from hfs.samplers.hnsw import HnswSampler
from hfs.samplers.random_negatives import RandomSampler
from hfs.samplers.refresh import RefreshPolicy, RemoteMatrix
from hfs.samplers.registry import SAMPLERS
from hfs.samplers.selection import auto_neighbours, select_active_classes
from hfs.samplers.selector import ActiveClassSelector

if TYPE_CHECKING:
    from hfs.config import HfsConfig, SamplerConfig
    from hfs.paramserver.base import WeightStore

__all__ = ["ActiveClassSelector", "AnnoySampler", "ClassSampler", "ExactSampler", "HnswSampler", "RandomSampler",
           "RefreshPolicy", "RemoteMatrix", "SAMPLERS", "auto_neighbours", "build_sampler", "build_selector",
           "select_active_classes", "sampler_kwargs"]


def sampler_kwargs(name: str, scfg: "SamplerConfig", metric: str) -> dict:
    """Constructor arguments of sampler ``name`` from the ``sampler`` config section."""
    per_sampler = {
        "annoy": dict(trees=scfg.annoy_trees, search_k=scfg.annoy_search_k, seed=scfg.seed,
                      build_threads=scfg.build_threads, query_threads=scfg.query_threads),
        "hnsw": dict(m=scfg.hnsw_m, ef_construction=scfg.hnsw_ef_construction, ef=scfg.hnsw_ef, seed=scfg.seed,
                     build_threads=scfg.build_threads, query_threads=scfg.query_threads),
        "exact": dict(chunk=scfg.exact_chunk, device=scfg.exact_device),
        "random": {},
    }
    return dict(metric=metric, **per_sampler.get(name, {}))


def build_sampler(name: str, scfg: "SamplerConfig", metric: str) -> ClassSampler:
    """A fresh, empty sampler of type ``name`` configured from ``scfg``."""
    SAMPLERS.get(name)  # unknown names: one 'did you mean' error before anything else
    return SAMPLERS.build(name, **sampler_kwargs(name, scfg, metric))


def build_selector(cfg: "HfsConfig", store: "WeightStore", matrix: str, num_classes: int) -> ActiveClassSelector:
    """The trainer's selector over ``store``'s matrix ``matrix`` (num_classes x D rows)."""
    scfg, metric = cfg.sampler, cfg.sampler_metric
    rows, dim = store.shape(matrix)
    if rows != num_classes:
        raise ValueError(f"store matrix '{matrix}' has {rows} rows but num_classes={num_classes}")
    policy = RefreshPolicy(scfg.refresh, scfg.interval, scfg.max_interval, scfg.drift_threshold)
    neighbours = scfg.k or auto_neighbours(cfg.fc.sample_num, cfg.train.batch_size, num_classes)
    chunk_rows = max(1, min(scfg.snapshot_rows, num_classes))
    return ActiveClassSelector(lambda: build_sampler(scfg.type, scfg, metric),
                               lambda: store.iter_chunks(matrix, chunk_rows), (num_classes, dim),
                               sample_num=cfg.fc.sample_num, neighbours=neighbours, policy=policy,
                               background=scfg.background, update_threshold=scfg.update_threshold,
                               update_budget=scfg.update_budget, seed=scfg.seed, workdir=scfg.workdir,
                               remote=remote_matrix(store, matrix, chunk_rows), drift_rows=scfg.drift_rows,
                               hard_after=scfg.hard_after)


def remote_matrix(store: "WeightStore", matrix: str, chunk_rows: int) -> RemoteMatrix | None:
    """Where index builds can read ``matrix`` themselves: a `hfs serve-params` client's shards, else None."""
    from hfs.paramserver.client import ParamClient

    if not isinstance(store, ParamClient):
        return None
    return RemoteMatrix(",".join(store.endpoints), matrix, chunk_rows, store.timeout_s, store.secret)
