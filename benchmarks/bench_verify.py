"""Time the verification metrics on a LFW-sized problem (6,000 pairs, 512-D embeddings).

    PYTHONPATH=. python benchmarks/bench_verify.py [--pairs 6000] [--dim 512] [--repeats 20]

Prints the median and best wall time of `evaluate_embeddings` (10-fold accuracy, VAL@FAR=1e-3,
AUC, EER) and of its parts, on synthetic embeddings whose same pairs are closer than different
ones, next to the per-threshold loop InsightFace's `calculate_roc` runs (the baseline, timed
once: it is slow). Recorded in docs/benchmarks.md under "Evaluation".
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from hfs.eval.verification import (cross_validated_accuracy, cross_validated_val, evaluate_embeddings,
                                   fold_bounds, pair_distances, sorted_fold_distances)


def synthetic_embeddings(pairs: int, dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Pairs sharing an identity are a common vector plus noise; others are unrelated."""
    rng = np.random.default_rng(seed)
    issame = rng.random(pairs) < 0.5
    a = rng.normal(size=(pairs, dim))
    b = np.where(issame[:, None], a + rng.normal(scale=8.0, size=(pairs, dim)), rng.normal(size=(pairs, dim)))
    emb = np.empty((2 * pairs, dim), dtype=np.float32)
    emb[0::2], emb[1::2] = a, b
    return emb, issame


def loop_accuracy_baseline(dist: np.ndarray, issame: np.ndarray, folds: int = 10) -> float:
    """InsightFace's calculate_roc accuracy part: a Python loop over folds x thresholds."""
    thresholds = np.arange(0, 4, 0.01)
    accs = []
    for test in np.array_split(np.arange(len(dist)), folds):
        train = np.setdiff1d(np.arange(len(dist)), test)
        acc_train = [np.mean(np.less(dist[train], t) == issame[train]) for t in thresholds]
        best = thresholds[int(np.argmax(acc_train))]
        accs.append(np.mean(np.less(dist[test], best) == issame[test]))
    return float(np.mean(accs))


def timed(fn, repeats: int) -> tuple[float, float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=6000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    emb, issame = synthetic_embeddings(args.pairs, args.dim)
    dist = pair_distances(emb)
    bounds = fold_bounds(args.pairs, 10)
    folds = sorted_fold_distances(dist, issame, bounds)
    result = evaluate_embeddings(emb, issame)
    rows = [("evaluate_embeddings (all metrics)", lambda: evaluate_embeddings(emb, issame)),
            ("  pair distances (normalise + distance)", lambda: pair_distances(emb)),
            ("  10-fold accuracy (400 thresholds)", lambda: cross_validated_accuracy(folds, bounds)),
            ("  VAL@FAR=1e-3 (4000 thresholds)", lambda: cross_validated_val(folds, 1e-3))]
    print(f"{args.pairs} pairs, {args.dim}-D, {args.repeats} repeats; accuracy {result.accuracy:.4f}, "
          f"AUC {result.auc:.4f}")
    for name, fn in rows:
        median, best = timed(fn, args.repeats)
        print(f"{name:42s} median {median * 1e3:8.2f} ms   best {best * 1e3:8.2f} ms")
    start = time.perf_counter()
    baseline = loop_accuracy_baseline(dist, issame)
    took = time.perf_counter() - start
    assert abs(baseline - result.accuracy) < 1e-12, (baseline, result.accuracy)
    print(f"{'baseline: per-threshold loop, accuracy only':42s} once   {took * 1e3:8.2f} ms   (same accuracy)")


if __name__ == "__main__":
    main()
