"""How good are an index's negatives *now*? Live quality of the store's index during training.

    PYTHONPATH=. python benchmarks/index_freshness.py --classes 100000 --steps 3000 \
        --cells annoy:0.01 exact:0.01 hnsw:0.01 --out docs/results/index_freshness_100k.json

An index answers from the rows it was built from; training moves the rows meanwhile. This
trains one cell of `time_to_accuracy.py`'s regime (same data, backbone, head, schedule) and
every ``--every`` steps asks the store's index for the ``k`` nearest classes of a fixed probe
batch (one unseen view each of ``--probe`` training identities) and compares its answer with
the exact nearest classes of the *current* matrix:

- ``index_sim``: mean cosine (current rows) of the index's candidates;
- ``exact_sim``: the same for the exact top-k (the ceiling), ``random_sim`` for all classes;
- ``recall``: share of the exact top-k the index returned;
- ``rerank{m}_sim`` / ``rerank{m}_recall``: asking for ``m x k`` candidates and keeping the
  ``k`` best by current similarity (what a re-ranking step could buy);
- ``builds`` and ``drift`` from the store's index statistics.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from evidence_common import record_each, script_parser, start_run  # noqa: E402
from time_to_accuracy import add_regime_args, cell_config, parse_cell, regime_data  # noqa: E402

log = logging.getLogger("index_freshness")


def overlap(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean over rows of |found ∩ truth| / |truth| (ids < 0 in ``found`` are padding)."""
    return float(np.mean([len(set(f[f >= 0].tolist()) & set(t.tolist())) / len(t) for f, t in zip(found, truth)]))


def mean_sim(sims: np.ndarray, ids: np.ndarray) -> float:
    """Mean of ``sims[i, ids[i, j]]`` over the valid (>= 0) ids."""
    valid = ids >= 0
    picked = np.take_along_axis(sims, np.where(valid, ids, 0), axis=1)
    return float(picked[valid].mean()) if valid.any() else float("nan")


def live_quality(store, matrix: str, features: np.ndarray, k: int, rerank: tuple[int, ...]) -> dict[str, Any]:
    """The index's answer for ``features`` (unit rows) against the exact top-k of the current matrix."""
    rows = np.concatenate([chunk for _, chunk in store.iter_chunks(matrix)])
    rows /= np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)
    sims = features @ rows.T
    exact = np.argpartition(-sims, k - 1, axis=1)[:, :k]
    out: dict[str, Any] = {"exact_sim": mean_sim(sims, exact), "random_sim": float(sims.mean())}
    answer = store.try_search(matrix, features, k)
    if answer is None or answer[0].shape[1] == 0:
        return out
    out.update(index_sim=mean_sim(sims, answer[0]), recall=overlap(answer[0], exact))
    for m in rerank:
        ids = store.try_search(matrix, features, min(k * m, len(rows)))[0]  # never more than the classes
        scored = np.where(ids >= 0, np.take_along_axis(sims, np.where(ids >= 0, ids, 0), axis=1), -np.inf)
        best = np.take_along_axis(ids, np.argsort(-scored, axis=1)[:, :k], axis=1)
        out[f"rerank{m}_sim"], out[f"rerank{m}_recall"] = mean_sim(sims, best), overlap(best, exact)
    return out


class FreshnessProbe:
    """Trainer callback: :func:`live_quality` of the store's index every ``every`` steps."""

    def __init__(self, probe_inputs, every: int, rerank: tuple[int, ...]) -> None:
        self.inputs, self.every, self.rerank = probe_inputs, every, rerank
        self.points: list[dict[str, Any]] = []

    def __call__(self, trainer, step: int, record: dict) -> None:
        import torch

        if step % self.every:
            return
        trainer.backbone.eval()
        try:
            with torch.no_grad():
                feats = trainer.backbone(self.inputs.to(trainer.device)).float().cpu().numpy()
        finally:
            trainer.backbone.train()
        feats = np.ascontiguousarray(feats / np.linalg.norm(feats, axis=1, keepdims=True), dtype=np.float32)
        fc = trainer.fc
        stats = fc.store.index_stats(fc.matrix)
        point = {"step": step, "k": fc.neighbours, "builds": stats.get("builds", 0), "drift": stats.get("drift", 0.0),
                 **live_quality(fc.store, fc.matrix, feats, fc.neighbours, self.rerank)}
        self.points.append(point)
        log.info("%s", {key: round(v, 3) if isinstance(v, float) else v for key, v in point.items()})


def run_cell(args: argparse.Namespace, cell: str) -> dict[str, Any]:
    import torch

    from hfs.train.trainer import Trainer

    torch.set_num_threads(args.threads)
    name, sample_num = parse_cell(cell, args.classes)
    if name == "full":
        raise SystemExit("index_freshness measures a sampled cell's index: give SAMPLER:RATE, not full")
    out_dir = Path(args.workdir) / cell.replace(":", "_")
    shutil.rmtree(out_dir, ignore_errors=True)
    cfg = cell_config(args, name, sample_num, out_dir, args.seed)
    train, val, _, _ = regime_data(args, args.seed, verify_identities=0)
    classes = np.sort(np.random.default_rng([args.data_seed, 5]).choice(args.classes, args.probe, replace=False))
    probe_inputs = torch.stack([val[int(c)][0] for c in classes])  # each probe class's held-out view
    probe = FreshnessProbe(probe_inputs, args.every, tuple(args.rerank))
    Trainer(cfg, datasets=(train, None, args.classes), callbacks=[probe]).run()
    shutil.rmtree(out_dir, ignore_errors=True)
    return {"cell": cell, "sampler": name, "sample_num": sample_num, "points": probe.points}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = script_parser(__doc__)
    p.add_argument("--classes", type=int, default=100_000, help="training identities C")
    p.add_argument("--cells", nargs="+", default=["annoy:0.01", "exact:0.01"], help="SAMPLER:RATE")
    p.add_argument("--steps", type=int, default=3000, help="training steps (the cosine schedule's length)")
    p.add_argument("--every", type=int, default=250, help="steps between probes")
    p.add_argument("--probe", type=int, default=64, help="probe identities")
    p.add_argument("--rerank", type=int, nargs="*", default=[4, 16], help="candidate multiples to re-rank")
    add_regime_args(p, batch=64)
    p.add_argument("--seed", type=int, default=0, help="training seed")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the generated identities")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="config override (repeatable)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--workdir", default="benchmarks/.cache/index_freshness", help="scratch folder")
    p.add_argument("--out", default="docs/results/index_freshness.json", help="JSON results (rewritten after each cell)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    context = start_run(args)
    record_each(args.out, context, (run_cell(args, cell) for cell in args.cells))
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
