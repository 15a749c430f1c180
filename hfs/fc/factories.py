"""The factories behind ``fc.mode``: full, sampled and sharded, registered in CLASSIFIERS.

Each builds its layer from the config sections it needs plus the :class:`ClassifierContext`,
restores what a resumed checkpoint holds of it, and registers its cleanup on ``ctx.stack``.
Values derived from the config (the capped ``sample_num``, each rank's sampler seed, the
queries per step, the store's snapshot folder) are worked out once, in :func:`plan_classifier`.
`hfs bench-fc` builds its sampled step from the same pieces (:func:`plan_classifier`,
:func:`create_matrix`, :func:`attach_sampled_index`, :func:`sampled_layer`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hfs.dist import barrier
from hfs.fc.full import FullFC
from hfs.fc.layer import CLASSIFIERS, ClassifierContext
from hfs.fc.sampled import SampledFC
from hfs.fc.sharded import ShardedFC, build_shard_selector, init_shard_rows, shard_bounds
from hfs.utils.errors import HfsError

log = logging.getLogger(__name__)

MATRIX = "fc"


@dataclass(frozen=True)
class ClassifierPlan:
    """Values derived from the config for one rank, computed once and never written back."""

    sample_num: int  # fc.sample_num, at most num_classes
    queries_per_step: int  # features that ask the index each step (train.batch_size)
    sampler_seed: int  # sampler.seed + rank: each rank draws its own random fill
    snapshot_dir: Path  # where the in-process store keeps snapshots


def plan_classifier(cfg: Any, num_classes: int, rank: int, *, sample_num: int | None = None,
                    batch_size: int | None = None, output_dir: str | Path | None = None) -> ClassifierPlan:
    """The derived values of one rank; ``sample_num``, ``batch_size`` and ``output_dir`` stand in for
    ``fc.sample_num``, ``train.batch_size`` and ``train.output_dir`` (a benchmark's own sizes)."""
    from hfs.paramserver import snapshot_dir_for

    sample_num = cfg.fc.sample_num if sample_num is None else sample_num
    return ClassifierPlan(sample_num=min(sample_num, num_classes),
                          queries_per_step=cfg.train.batch_size if batch_size is None else batch_size,
                          sampler_seed=cfg.sampler.seed + rank,
                          snapshot_dir=snapshot_dir_for(cfg.paramserver, output_dir or cfg.train.output_dir))


def create_matrix(store: Any, cfg: Any, num_classes: int, seed: int) -> None:
    """The classifier matrix in ``store`` (kept when it exists), initialised as ``fc.init`` says."""
    store.create(MATRIX, num_classes, cfg.model.embedding_size, init=cfg.fc.init, std=cfg.fc.init_std,
                 seed=seed, exist_ok=True, update_rule=cfg.paramserver.update_rule)


def sampled_index(cfg: Any, num_classes: int, plan: ClassifierPlan) -> Any:
    """The IndexSpec the store keeps over the matrix (``hfs.samplers.index_spec``), or None when no
    index is needed (every class active, or ``sampler.type: random``). Seeded by ``sampler.seed``,
    not the rank's seed: every rank sends the same spec, so a shared store builds one index."""
    from hfs.samplers import SAMPLERS, index_spec

    if plan.sample_num >= num_classes or not SAMPLERS.get(cfg.sampler.type).has_candidates:
        return None
    return index_spec(cfg.sampler, cfg.sampler_metric, seed=cfg.sampler.seed)


#: multiply-adds per step above which an exact scan on a CPU earns a warning (~0.1-0.2 s of one core)
EXACT_CPU_WARN_MACS = 2e9


def exact_scan_warning(cfg: Any, num_classes: int, plan: ClassifierPlan) -> str | None:
    """A warning when ``sampler.type=exact`` would scan a large matrix on a CPU every step, else None.

    exact is the default because its negatives are current (annoy and hnsw answer from rows
    hundreds of steps old while training moves them; docs/benchmarks.md), but its cost is
    B x C x D multiply-adds per step: nothing on a GPU, seconds on a CPU at millions of classes.
    The device checked is this process's; a `serve-params` store scans on its own host's.
    """
    if cfg.sampler.type != "exact" or plan.sample_num >= num_classes:
        return None
    import torch

    device = cfg.sampler.exact_device
    on_cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    macs = float(plan.queries_per_step) * num_classes * cfg.model.embedding_size
    if not on_cpu or macs < EXACT_CPU_WARN_MACS:
        return None
    return (f"sampler.type=exact scans all {num_classes:,} classes for each of the step's {plan.queries_per_step} "
            f"features on the CPU: {macs / 1e9:.0f}G multiply-adds per step. At this cost on a CPU uniform negatives "
            "(sampler.type=random, Partial FC's rule) trained better models for the same CPU time; scan on a GPU "
            "(sampler.exact_device) to keep hard ones (docs: 'Which sampler should I use?')")


def attach_sampled_index(cfg: Any, store: Any, num_classes: int, plan: ClassifierPlan) -> bool:
    """Ask ``store`` to keep the index of :func:`sampled_index` over the matrix; False when none is needed."""
    spec = sampled_index(cfg, num_classes, plan)
    if spec is None:
        return False
    warning = exact_scan_warning(cfg, num_classes, plan)
    if warning:
        log.warning("%s", warning)
    store.attach_index(MATRIX, spec)
    return True


def sampled_layer(cfg: Any, store: Any, head: Any, num_classes: int, plan: ClassifierPlan,
                  workers: int = 1) -> SampledFC:
    """SampledFC over ``store`` with the rank's selection rule; ``workers`` ranks push to the store each step."""
    from hfs.samplers import SelectionRule, neighbours_for

    rule = SelectionRule.from_config(cfg.sampler, plan.sample_num, plan.sampler_seed)
    indexed = sampled_index(cfg, num_classes, plan) is not None
    neighbours = neighbours_for(cfg.sampler, plan.sample_num, plan.queries_per_step, num_classes) if indexed else 0
    return SampledFC(store, head, rule=rule, neighbours=neighbours, matrix=MATRIX, overlap_push=cfg.fc.overlap_push,
                     lr_scale=cfg.fc.lr_scale, workers=workers)


def _does_not_fit(ctx: ClassifierContext, cfg: Any, exc: Exception) -> HfsError:
    return HfsError(f"checkpoint {ctx.checkpoint_path} does not fit model.arch={cfg.model.arch} "
                    f"embedding_size={cfg.model.embedding_size}: {str(exc).splitlines()[0]}")


# --------------------------------------------------------------------------- full


@CLASSIFIERS.register("full")
def build_full(cfg: Any, ctx: ClassifierContext) -> FullFC:
    """The whole matrix as a parameter of the trainer's optimizer."""
    fc = FullFC(ctx.num_classes, cfg.model.embedding_size, ctx.head, init=cfg.fc.init, init_std=cfg.fc.init_std,
                seed=cfg.train.seed, lr_scale=cfg.fc.lr_scale).to(ctx.device)
    if ctx.checkpoint is not None:
        try:
            fc.load_state_dict(ctx.checkpoint["fc"])
        except (RuntimeError, ValueError) as exc:
            raise _does_not_fit(ctx, cfg, exc) from None
    return fc


# --------------------------------------------------------------------------- sampled


@CLASSIFIERS.register("sampled")
def build_sampled(cfg: Any, ctx: ClassifierContext) -> SampledFC:
    """HF-softmax over a weight store (in-process, or `hfs serve-params` shared by every rank)."""
    from hfs.paramserver import open_store

    plan = plan_classifier(cfg, ctx.num_classes, ctx.env.rank)
    if plan.sample_num < cfg.fc.sample_num:
        log.warning("fc.sample_num=%d is more than the %d classes: every class is active each step",
                    cfg.fc.sample_num, ctx.num_classes)
    env, ps = ctx.env, cfg.paramserver
    if env.distributed and not ps.address:
        raise HfsError("fc.mode=sampled on several ranks needs one shared store: set paramserver.address "
                       "(`hfs train-dist` starts a server itself when it is empty)")
    if ps.keep_snapshots < cfg.train.keep_checkpoints:
        log.warning("paramserver.keep_snapshots=%d < train.keep_checkpoints=%d: the oldest checkpoints "
                    "will name store snapshots that no longer exist", ps.keep_snapshots, cfg.train.keep_checkpoints)
    store = open_store(ps, plan.snapshot_dir, resume_hint=ctx.resume_hint)
    ctx.stack.callback(store.close)
    if env.is_main:  # one rank creates / restores the shared matrix, the others wait for it
        _create_or_restore(store, cfg, ctx)
    if env.distributed:
        # Every rank is a worker of the store's synchronous step; all must be registered
        # before anyone pushes, or the first step would be applied with fewer workers.
        worker = f"rank-{env.rank}"
        store.register(worker)
        ctx.stack.callback(store.leave, worker)
    barrier()
    # every rank sends the same spec: the store builds one index over its rows (no-op when attached)
    attach_sampled_index(cfg, store, ctx.num_classes, plan)
    fc = sampled_layer(cfg, store, ctx.head, ctx.num_classes, plan, workers=env.world_size)
    ctx.stack.callback(fc.close)
    return fc


build_sampled.shared_store = True  # type: ignore[attr-defined]  # every rank reads and pushes one store


def _create_or_restore(store: Any, cfg: Any, ctx: ClassifierContext) -> None:
    """Create the matrix (kept when it exists), then restore the checkpoint's snapshot or
    refuse a matrix another run already trained."""
    create_matrix(store, cfg, ctx.num_classes, cfg.train.seed)
    if ctx.checkpoint is not None:
        _restore_store(store, ctx.checkpoint, ctx.checkpoint_path)
        # the snapshot brings the rule it was trained with; the run's config decides from here
        create_matrix(store, cfg, ctx.num_classes, cfg.train.seed)
    elif (trained_to := store.last_applied(MATRIX)) >= 0:
        raise HfsError(
            f"the parameter server at {cfg.paramserver.address} already holds a matrix '{MATRIX}' trained "
            f"to step {trained_to} by another run; a fresh run needs a fresh server "
            f"(restart `hfs serve-params`), or continue that run with --resume")


def _restore_store(store: Any, ckpt: dict, path: Path | None) -> None:
    tag = ckpt.get("store_snapshot")
    if not tag:
        raise HfsError(f"checkpoint {path} has no weight-store snapshot (it was written by a fc.mode=full run)")
    try:
        step = store.restore(tag)
    except HfsError:
        raise
    except Exception as exc:  # noqa: BLE001 - the store names what is missing
        raise HfsError(f"cannot restore weight-store snapshot '{tag}' of {path}: {exc}") from None
    if step != ckpt["step"]:
        raise HfsError(f"weight-store snapshot '{tag}' is at step {step}, checkpoint at {ckpt['step']}")


# --------------------------------------------------------------------------- sharded


@CLASSIFIERS.register("sharded")
def build_sharded(cfg: Any, ctx: ClassifierContext) -> ShardedFC:
    """This rank's shard of the rows (the world-size independent initial matrix, or the
    checkpoint's), with its own index over its shard when ``sampler.type`` is not random."""
    start, end = shard_bounds(ctx.num_classes, ctx.env.rank, ctx.env.world_size)
    rows = init_shard_rows(start, end, cfg.model.embedding_size, cfg.fc.init, cfg.fc.init_std, cfg.train.seed)
    fc = ShardedFC(rows, ctx.num_classes, ctx.head, sample_num=cfg.fc.sample_num, seed=cfg.sampler.seed,
                   lr_scale=cfg.fc.lr_scale, momentum_rule=cfg.fc.sharded_momentum).to(ctx.device)
    if ctx.checkpoint is not None:
        try:
            fc.load_full_weight(ctx.checkpoint["fc"]["weight"].to(ctx.device))
        except (RuntimeError, ValueError) as exc:
            raise _does_not_fit(ctx, cfg, exc) from None
    # the index is built from the rows as they are now: after a resume, the loaded ones
    selector = build_shard_selector(cfg.sampler, fc, cfg.train.batch_size, seed=cfg.sampler.seed + ctx.env.rank,
                                    metric=cfg.sampler_metric)
    if selector is not None:
        fc.attach_selector(selector)
        ctx.stack.callback(fc.close)
    return fc


build_sharded.launcher_only = True  # type: ignore[attr-defined]  # model-parallel: one shard per rank
