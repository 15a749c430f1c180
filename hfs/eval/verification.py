"""Face-verification metrics with the standard LFW/InsightFace protocol, vectorised.

The protocol, exactly as InsightFace's ``verification.py`` evaluates ``.bin`` sets:

* pairs are embeddings ``(2i, 2i + 1)``; embeddings are L2-normalised; the score is the
  squared Euclidean distance (0 = identical, 4 = opposite); a pair is predicted "same" when
  ``distance < threshold``;
* thresholds ``np.arange(0, 4, 0.01)``; the pairs are cut into ``k`` contiguous folds (the
  split of ``sklearn.model_selection.KFold(k, shuffle=False)``: the first ``n % k`` folds get
  one extra pair); for each fold the threshold with the best accuracy on the other ``k - 1``
  folds (the first one on ties) scores the held-out fold; accuracy is the mean and (population)
  standard deviation over folds;
* VAL@FAR: thresholds ``np.arange(0, 4, 0.001)``; per fold, the threshold at which the
  training folds' FAR reaches the target is interpolated on the (FAR, threshold) curve and
  applied to the held-out fold.

Instead of a Python loop over thresholds, each fold's distances are sorted once and
``searchsorted`` counts the accepted pairs at every threshold, so 6,000 pairs take
milliseconds.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

ACCURACY_THRESHOLDS_STEP = 0.01
VAL_THRESHOLDS_STEP = 0.001
MAX_DISTANCE = 4.0
DEFAULT_FAR_TARGET = 1e-3


def accuracy_thresholds() -> np.ndarray:
    return np.arange(0, MAX_DISTANCE, ACCURACY_THRESHOLDS_STEP)


def val_thresholds() -> np.ndarray:
    return np.arange(0, MAX_DISTANCE, VAL_THRESHOLDS_STEP)


def fold_bounds(num_pairs: int, folds: int) -> list[tuple[int, int]]:
    """Contiguous [start, stop) folds, identical to ``KFold(folds, shuffle=False)``."""
    if folds < 2 or folds > num_pairs:
        raise ValueError(f"need 2 <= folds <= pairs, got folds={folds} for {num_pairs} pairs")
    sizes = np.full(folds, num_pairs // folds)
    sizes[: num_pairs % folds] += 1
    stops = np.cumsum(sizes)
    return [(int(stop - size), int(stop)) for size, stop in zip(sizes, stops)]


def l2_normalize(embeddings: np.ndarray) -> np.ndarray:
    """Row-wise L2 normalisation; all-zero rows stay zero (as sklearn's ``normalize``)."""
    x = np.asarray(embeddings, dtype=np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    norms[norms == 0] = 1.0
    return x / norms


def pair_distances(embeddings: np.ndarray) -> np.ndarray:
    """Squared Euclidean distance between normalised embeddings 2i and 2i+1."""
    x = np.asarray(embeddings)
    if x.ndim != 2 or len(x) % 2:
        raise ValueError(f"embeddings must be a 2-D array with an even number of rows, got shape {x.shape}")
    x = l2_normalize(x)
    diff = x[0::2] - x[1::2]
    return np.einsum("ij,ij->i", diff, diff)


def count_accepted(sorted_dist: np.ndarray, thresholds: np.ndarray | float) -> np.ndarray:
    """How many of ``sorted_dist`` are strictly below each threshold (predicted "same")."""
    return np.searchsorted(sorted_dist, thresholds, side="left")


@dataclass
class FoldCounts:
    """Per-fold accepted counts at every threshold, split by ground truth."""

    true_accepts: np.ndarray   # (folds, T): same pairs with distance < threshold
    false_accepts: np.ndarray  # (folds, T): different pairs with distance < threshold
    n_same: np.ndarray         # (folds,)
    n_diff: np.ndarray         # (folds,)

    def held_out(self, f: int) -> "FoldCounts":
        """Counts of every fold except ``f`` (the training folds for fold ``f``)."""
        return FoldCounts(self.true_accepts.sum(0, keepdims=True) - self.true_accepts[f:f + 1],
                          self.false_accepts.sum(0, keepdims=True) - self.false_accepts[f:f + 1],
                          self.n_same.sum(keepdims=True) - self.n_same[f:f + 1],
                          self.n_diff.sum(keepdims=True) - self.n_diff[f:f + 1])

    def correct(self) -> np.ndarray:
        """(folds, T) correctly classified pairs: true accepts + true rejects."""
        return self.true_accepts + (self.n_diff[:, None] - self.false_accepts)


def sorted_fold_distances(dist: np.ndarray, issame: np.ndarray,
                          bounds: list[tuple[int, int]]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per fold: (sorted distances of same pairs, sorted distances of different pairs)."""
    return [(np.sort(dist[a:b][issame[a:b]]), np.sort(dist[a:b][~issame[a:b]])) for a, b in bounds]


def fold_counts(sorted_folds: list[tuple[np.ndarray, np.ndarray]], thresholds: np.ndarray) -> FoldCounts:
    return FoldCounts(np.stack([count_accepted(s, thresholds) for s, _ in sorted_folds]),
                      np.stack([count_accepted(d, thresholds) for _, d in sorted_folds]),
                      np.array([len(s) for s, _ in sorted_folds]),
                      np.array([len(d) for _, d in sorted_folds]))


def best_threshold_index(counts: FoldCounts) -> int:
    """Index of the threshold with the most correct pairs over ``counts`` (first on ties)."""
    return int(np.argmax(counts.correct().sum(0)))


def threshold_at_far(far: np.ndarray, thresholds: np.ndarray, target: float) -> float:
    """The threshold where the non-decreasing FAR curve reaches ``target``, by linear interpolation.

    Many thresholds share one FAR (few different pairs, fine threshold grid); SciPy's
    ``interp1d`` refuses such duplicates. The curve is walked as the piecewise-linear line
    through every (FAR, threshold) point: with ``j`` the last point whose FAR <= target, an
    exact hit returns threshold ``j`` (the largest threshold with that FAR) and otherwise the
    result interpolates between point ``j`` and point ``j + 1``.
    """
    j = int(np.searchsorted(far, target, side="right")) - 1
    if j < 0:
        return float(thresholds[0])
    if j == len(far) - 1 or far[j] == target:
        return float(thresholds[j])
    t = (target - far[j]) / (far[j + 1] - far[j])
    return float(thresholds[j] + t * (thresholds[j + 1] - thresholds[j]))


@dataclass
class RocCurve:
    """The exact ROC over all pairs (every distinct distance is a threshold)."""

    fpr: np.ndarray
    tpr: np.ndarray
    thresholds: np.ndarray  # accept when distance <= threshold


def roc_curve(dist: np.ndarray, issame: np.ndarray) -> RocCurve:
    """ROC points from (0, 0) to (1, 1); tied distances move the curve diagonally."""
    order = np.argsort(dist, kind="stable")
    d, same = dist[order], issame[order]
    last_of_group = np.r_[np.flatnonzero(np.diff(d) != 0), len(d) - 1]
    tp = np.cumsum(same)[last_of_group]
    fp = np.cumsum(~same)[last_of_group]
    n_same, n_diff = max(int(same.sum()), 1), max(int((~same).sum()), 1)
    return RocCurve(np.r_[0.0, fp / n_diff], np.r_[0.0, tp / n_same], np.r_[-np.inf, d[last_of_group]])


def roc_auc(dist: np.ndarray, issame: np.ndarray) -> float:
    """P(a same pair is closer than a different pair), ties counted half (Mann-Whitney U)."""
    diff_sorted = np.sort(dist[~issame])
    same = dist[issame]
    below_or_equal = np.searchsorted(diff_sorted, same, side="right")
    ties = below_or_equal - np.searchsorted(diff_sorted, same, side="left")
    farther = len(diff_sorted) - below_or_equal
    return float((farther.sum() + 0.5 * ties.sum()) / (len(same) * len(diff_sorted)))


def equal_error_rate(roc: RocCurve) -> float:
    """The rate where FAR equals FRR (1 - TPR), interpolated linearly along the ROC."""
    gap = (1.0 - roc.tpr) - roc.fpr  # falls from +1 to -1 along the curve
    i = int(np.argmax(gap <= 0))
    if i == 0:
        return float(roc.fpr[0])
    t = gap[i - 1] / (gap[i - 1] - gap[i])
    return float(roc.fpr[i - 1] + t * (roc.fpr[i] - roc.fpr[i - 1]))


@dataclass
class VerificationResult:
    """Scores of one verification set; ``to_dict`` is what ``--json`` writes."""

    pairs: int
    folds: int
    accuracy: float
    accuracy_std: float
    best_threshold: float
    val: float
    val_std: float
    far: float
    far_target: float
    auc: float
    eer: float
    fold_accuracies: list[float]
    fold_thresholds: list[float]
    roc: RocCurve = field(repr=False)

    def to_dict(self) -> dict:
        out = asdict(self)
        out.pop("roc")
        return out


def _ratio(num: np.ndarray | float, den: np.ndarray | float, empty: float) -> np.ndarray:
    """num / den, with ``empty`` where den == 0 (a fold without same or without different pairs)."""
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    return np.divide(num, den, out=np.full(np.broadcast(num, den).shape, empty), where=den > 0)


def cross_validated_accuracy(sorted_folds, bounds) -> tuple[np.ndarray, np.ndarray]:
    """Per fold: (held-out accuracy, threshold chosen on the other folds)."""
    thresholds = accuracy_thresholds()
    counts = fold_counts(sorted_folds, thresholds)
    correct = counts.correct()
    sizes = np.array([b - a for a, b in bounds])
    train_correct = correct.sum(0, keepdims=True) - correct  # (folds, T): all folds but f
    best = np.argmax(train_correct, axis=1)  # first best on ties
    acc = correct[np.arange(len(bounds)), best] / sizes
    return acc, thresholds[best]


def cross_validated_val(sorted_folds, far_target: float) -> tuple[np.ndarray, np.ndarray]:
    """Per fold: (VAL, FAR) on the held-out fold at the training folds' FAR=target threshold."""
    thresholds = val_thresholds()
    counts = fold_counts(sorted_folds, thresholds)
    vals, fars = [], []
    for f, (same, diff) in enumerate(sorted_folds):
        train = counts.held_out(f)
        far_train = _ratio(train.false_accepts[0], train.n_diff[0], 0.0)
        thr = threshold_at_far(far_train, thresholds, far_target) if far_train.max() >= far_target else 0.0
        vals.append(_ratio(count_accepted(same, thr), len(same), np.nan))  # undefined: left out of the mean
        fars.append(_ratio(count_accepted(diff, thr), len(diff), np.nan))
    return np.array(vals, dtype=np.float64), np.array(fars, dtype=np.float64)


def evaluate_distances(dist: np.ndarray, issame: np.ndarray, folds: int = 10,
                       far_target: float = DEFAULT_FAR_TARGET) -> VerificationResult:
    """All metrics from per-pair squared distances and ground truth."""
    dist = np.asarray(dist, dtype=np.float64)
    issame = np.asarray(issame, dtype=bool)
    if dist.shape != issame.shape or dist.ndim != 1:
        raise ValueError(f"{dist.shape[0] if dist.ndim else 0} distances for {issame.size} pairs")
    if not np.isfinite(dist).all():
        raise ValueError("distances contain NaN or infinity (non-finite embeddings)")
    if issame.all() or not issame.any():
        raise ValueError("verification needs both same-identity and different-identity pairs")
    bounds = fold_bounds(len(dist), folds)
    sorted_folds = sorted_fold_distances(dist, issame, bounds)
    acc, chosen = cross_validated_accuracy(sorted_folds, bounds)
    vals, fars = cross_validated_val(sorted_folds, far_target)
    overall = fold_counts(sorted_fold_distances(dist, issame, [(0, len(dist))]), accuracy_thresholds())
    roc = roc_curve(dist, issame)
    return VerificationResult(
        pairs=len(dist), folds=folds, accuracy=float(acc.mean()), accuracy_std=float(acc.std()),
        best_threshold=float(accuracy_thresholds()[best_threshold_index(overall)]),
        val=float(np.nanmean(vals)), val_std=float(np.nanstd(vals)), far=float(np.nanmean(fars)), far_target=far_target,
        auc=roc_auc(dist, issame), eer=equal_error_rate(roc),
        fold_accuracies=[float(a) for a in acc], fold_thresholds=[float(t) for t in chosen], roc=roc)


def evaluate_embeddings(embeddings: np.ndarray, issame: np.ndarray, folds: int = 10,
                        far_target: float = DEFAULT_FAR_TARGET) -> VerificationResult:
    """All metrics for 2N embeddings (pairs 2i, 2i+1) and N ground-truth flags."""
    embeddings = np.asarray(embeddings)
    issame = np.asarray(issame, dtype=bool)
    if embeddings.ndim != 2 or len(embeddings) != 2 * len(issame):
        raise ValueError(f"{len(embeddings)} embeddings for {len(issame)} pairs (need {2 * len(issame)})")
    return evaluate_distances(pair_distances(embeddings), issame, folds, far_target)
