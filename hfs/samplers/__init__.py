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
from hfs.samplers.selection import Selection, SelectionRule, auto_neighbours, select_active_classes
from hfs.samplers.selector import ActiveClassSelector

if TYPE_CHECKING:
    from hfs.config import SamplerConfig
    from hfs.paramserver.base import WeightStore

__all__ = ["ActiveClassSelector", "AnnoySampler", "ClassSampler", "ExactSampler", "HnswSampler", "RandomSampler",
           "RefreshPolicy", "RemoteMatrix", "SAMPLERS", "Selection", "SelectionRule", "auto_neighbours", "build_sampler", "build_selector",
           "neighbours_for", "refresh_policy", "select_active_classes", "sampler_kwargs"]


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


def neighbours_for(sampler_cfg: "SamplerConfig", sample_num: int, queries_per_step: int, num_classes: int) -> int:
    """Candidates asked per query: ``sampler.k``, or when 0 enough for ``sample_num`` over the step's queries."""
    return sampler_cfg.k or auto_neighbours(sample_num, queries_per_step, num_classes)


def refresh_policy(sampler_cfg: "SamplerConfig") -> RefreshPolicy:
    """The configured rebuild schedule (``sampler.refresh``, ``interval``, ``max_interval``, ``drift_threshold``)."""
    return RefreshPolicy(sampler_cfg.refresh, sampler_cfg.interval, sampler_cfg.max_interval,
                         sampler_cfg.drift_threshold)


def build_selector(sampler_cfg: "SamplerConfig", *, store: "WeightStore", num_classes: int, sample_num: int,
                   queries_per_step: int, seed: int, metric: str, matrix: str = "fc",
                   policy: RefreshPolicy | None = None) -> ActiveClassSelector:
    """A selector of ``sample_num`` active classes per step over ``store``'s matrix ``matrix``.

    ``queries_per_step`` is how many features ask the index each step (sizes ``k = 0``),
    ``seed`` seeds its random fill, ``metric`` is the resolved ``sampler.metric``; the
    caller works these out (once) for its rank and layout. ``policy`` replaces the
    configured refresh schedule (a benchmark's frozen index). ``store`` is anything with
    ``shape``, ``iter_chunks`` and ``reader_spec`` (a WeightStore, a shard or array view):
    when ``reader_spec()`` names a server, index builds read the rows themselves.
    """
    scfg = sampler_cfg
    rows, dim = store.shape(matrix)
    if rows != num_classes:
        raise ValueError(f"store matrix '{matrix}' has {rows} rows but num_classes={num_classes}")
    chunk_rows = max(1, min(scfg.snapshot_rows, num_classes))
    reader = store.reader_spec()
    return ActiveClassSelector(lambda: build_sampler(scfg.type, scfg, metric, seed=seed),
                               lambda: store.iter_chunks(matrix, chunk_rows), (num_classes, dim),
                               sample_num=sample_num,
                               neighbours=neighbours_for(scfg, sample_num, queries_per_step, num_classes),
                               policy=policy or refresh_policy(scfg),
                               background=scfg.background, update_threshold=scfg.update_threshold,
                               update_budget=scfg.update_budget, seed=seed, workdir=scfg.workdir,
                               remote=RemoteMatrix(reader, matrix, chunk_rows) if reader is not None else None,
                               drift_rows=scfg.drift_rows, hard_after=scfg.hard_after,
                               rule=SelectionRule.from_config(scfg, sample_num, seed))
