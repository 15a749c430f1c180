"""Class samplers: which classes are active in a mini-batch.

``index_spec(sampler_cfg, metric, seed)`` is the :class:`IndexSpec` a classifier factory
(``hfs.fc.factories``) sends to the weight store, which owns the index over its rows
(:class:`OwnedIndex`) and answers ``select``; ``build_selector(...)`` wraps the same index
with the selection rule for a holder that asks its own index (the sharded classifier, the
benchmarks). Samplers: ``annoy``, ``hnsw``, ``ivf``, ``exact``, ``random`` (see ``SAMPLERS``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from hfs.samplers.annoy_forest import AnnoySampler
from hfs.samplers.base import ClassSampler
from hfs.samplers.exact import ExactSampler
from hfs.samplers.hnsw import HnswSampler
from hfs.samplers.ivf import IvfSampler
from hfs.samplers.owned import IndexSpec, OwnedIndex
from hfs.samplers.random_negatives import RandomSampler
from hfs.samplers.refresh import RefreshPolicy
from hfs.samplers.registry import SAMPLERS
from hfs.samplers.selection import Selection, SelectionRule, auto_neighbours, select_active_classes
from hfs.samplers.selector import ActiveClassSelector

if TYPE_CHECKING:
    from hfs.config import SamplerConfig

__all__ = ["ActiveClassSelector", "AnnoySampler", "ClassSampler", "ExactSampler", "HnswSampler", "IndexSpec",
           "IvfSampler", "OwnedIndex", "RandomSampler", "RefreshPolicy", "SAMPLERS", "Selection", "SelectionRule", "auto_neighbours",
           "build_sampler", "build_selector", "index_spec", "neighbours_for", "refresh_policy",
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
        "ivf": dict(nlist=scfg.ivf_nlist, nprobe=scfg.ivf_nprobe, seed=seed, build_threads=scfg.build_threads,
                    query_threads=scfg.query_threads),
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


def index_spec(sampler_cfg: "SamplerConfig", metric: str, seed: int | None = None,
               policy: RefreshPolicy | None = None) -> IndexSpec:
    """The ``sampler`` section as the :class:`IndexSpec` an index holder builds from.

    ``seed`` seeds the index builds (``sampler.seed`` when None; the ranks of one job send
    the same spec to a shared store, so it builds one index for all of them); ``policy``
    replaces the configured refresh schedule (a benchmark's frozen index).
    """
    scfg = sampler_cfg
    policy = policy or refresh_policy(scfg)
    return IndexSpec(sampler=scfg.type, kwargs=sampler_kwargs(scfg.type, scfg, metric, seed),
                     refresh=policy.mode, interval=policy.interval, max_interval=policy.max_interval,
                     drift_threshold=policy.drift_threshold, background=scfg.background,
                     update_threshold=scfg.update_threshold, update_budget=scfg.update_budget,
                     drift_rows=scfg.drift_rows, chunk_rows=scfg.snapshot_rows, workdir=scfg.workdir,
                     seed=scfg.seed if seed is None else seed)


def build_selector(sampler_cfg: "SamplerConfig", *, store: Any, num_classes: int, sample_num: int,
                   queries_per_step: int, seed: int, metric: str, matrix: str = "fc",
                   policy: RefreshPolicy | None = None) -> ActiveClassSelector:
    """A selector of ``sample_num`` active classes per step over a matrix its caller holds.

    ``store`` is anything with ``shape(matrix)``, ``iter_chunks(matrix, chunk_rows)`` and
    ``get_rows(matrix, ids)`` read in the caller's thread (a shard view, an array view): the index is built from
    those rows. ``queries_per_step`` is how many features ask the index each step (sizes
    ``k = 0``), ``seed`` seeds the random fill and the builds, ``metric`` is the resolved
    ``sampler.metric``; ``policy`` replaces the configured refresh schedule.
    """
    scfg = sampler_cfg
    rows, dim = store.shape(matrix)
    if rows != num_classes:
        raise ValueError(f"store matrix '{matrix}' has {rows} rows but num_classes={num_classes}")
    spec = index_spec(scfg, metric, seed, policy)
    chunk_rows = max(1, min(scfg.snapshot_rows, num_classes))
    return ActiveClassSelector(spec, lambda: store.iter_chunks(matrix, chunk_rows), (num_classes, dim),
                               rule=SelectionRule.from_config(scfg, sample_num, seed),
                               read_rows=lambda ids: store.get_rows(matrix, ids),
                               neighbours=neighbours_for(scfg, sample_num, queries_per_step, num_classes))
