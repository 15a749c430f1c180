"""Class samplers: which classes are active in a mini-batch.

``build_selector(sampler_cfg, store=..., num_classes=..., ...)`` is what the classifier
factories (``hfs.fc.factories``) and the benchmarks call; it wraps the
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
    from hfs.config import SamplerConfig
    from hfs.paramserver.base import WeightStore

__all__ = ["ActiveClassSelector", "AnnoySampler", "ClassSampler", "ExactSampler", "HnswSampler", "RandomSampler",
           "RefreshPolicy", "RemoteMatrix", "SAMPLERS", "auto_neighbours", "build_sampler", "build_selector",
           "select_active_classes", "sampler_kwargs"]


def sampler_kwargs(name: str, scfg: "SamplerConfig", metric: str, seed: int | None = None) -> dict:
    """Constructor arguments of sampler ``name`` from the ``sampler`` config section
    (``seed`` replaces ``sampler.seed``: each rank seeds its own)."""
    seed = scfg.seed if seed is None else seed
    per_sampler = {
        "annoy": dict(trees=scfg.annoy_trees, search_k=scfg.annoy_search_k, seed=seed,
                      build_threads=scfg.build_threads, query_threads=scfg.query_threads),
        "hnsw": dict(m=scfg.hnsw_m, ef_construction=scfg.hnsw_ef_construction, ef=scfg.hnsw_ef, seed=seed,
                     build_threads=scfg.build_threads, query_threads=scfg.query_threads),
        "exact": dict(chunk=scfg.exact_chunk, device=scfg.exact_device),
        "random": {},
    }
    return dict(metric=metric, **per_sampler.get(name, {}))


def build_sampler(name: str, scfg: "SamplerConfig", metric: str, seed: int | None = None) -> ClassSampler:
    """A fresh, empty sampler of type ``name`` configured from ``scfg`` (``seed``: see sampler_kwargs)."""
    SAMPLERS.get(name)  # unknown names: one 'did you mean' error before anything else
    return SAMPLERS.build(name, **sampler_kwargs(name, scfg, metric, seed))


def build_selector(sampler_cfg: "SamplerConfig", *, store: "WeightStore", num_classes: int, sample_num: int,
                   queries_per_step: int, seed: int, metric: str, matrix: str = "fc") -> ActiveClassSelector:
    """A selector of ``sample_num`` active classes per step over ``store``'s matrix ``matrix``.

    ``queries_per_step`` is how many features ask the index each step (sizes ``k = 0``),
    ``seed`` seeds its random fill, ``metric`` is the resolved ``sampler.metric``; the
    caller works these out (once) for its rank and layout.
    """
    scfg = sampler_cfg
    rows, dim = store.shape(matrix)
    if rows != num_classes:
        raise ValueError(f"store matrix '{matrix}' has {rows} rows but num_classes={num_classes}")
    policy = RefreshPolicy(scfg.refresh, scfg.interval, scfg.max_interval, scfg.drift_threshold)
    neighbours = scfg.k or auto_neighbours(sample_num, queries_per_step, num_classes)
    chunk_rows = max(1, min(scfg.snapshot_rows, num_classes))
    return ActiveClassSelector(lambda: build_sampler(scfg.type, scfg, metric, seed=seed),
                               lambda: store.iter_chunks(matrix, chunk_rows), (num_classes, dim),
                               sample_num=sample_num, neighbours=neighbours, policy=policy,
                               background=scfg.background, update_threshold=scfg.update_threshold,
                               update_budget=scfg.update_budget, seed=seed, workdir=scfg.workdir,
                               remote=remote_matrix(store, matrix, chunk_rows), drift_rows=scfg.drift_rows,
                               hard_after=scfg.hard_after)


def remote_matrix(store: "WeightStore", matrix: str, chunk_rows: int) -> RemoteMatrix | None:
    """Where index builds can read ``matrix`` themselves: a `hfs serve-params` client's shards, else None."""
    from hfs.paramserver.client import ParamClient

    if not isinstance(store, ParamClient):
        return None
    return RemoteMatrix(",".join(store.endpoints), matrix, chunk_rows, store.timeout_s, store.secret)
