import numpy as np
import pytest

from hfs.eval.verification import (evaluate_distances, evaluate_embeddings, fold_bounds, pair_distances,
                                   roc_auc, roc_curve, equal_error_rate, threshold_at_far)


def embeddings_with_distances(dist, dim: int = 4, seed: int = 0) -> np.ndarray:
    """2N unit-norm-able embeddings whose pair i has squared L2 distance dist[i] after normalising."""
    rng = np.random.default_rng(seed)
    out = []
    for d in dist:
        cos = 1.0 - d / 2.0
        a = np.zeros(dim)
        a[0] = 1.0
        b = np.zeros(dim)
        b[0], b[1] = cos, np.sqrt(max(0.0, 1.0 - cos * cos))
        scale_a, scale_b = rng.uniform(0.5, 3.0, 2)  # normalisation must not matter
        out += [a * scale_a, b * scale_b]
    return np.array(out, dtype=np.float32)


def insightface_style_accuracy(dist, issame, folds):
    """The reference loop (InsightFace calculate_roc): per fold, per threshold, np.less."""
    thresholds = np.arange(0, 4, 0.01)
    accs, chosen = [], []
    for test in np.array_split(np.arange(len(dist)), folds):
        train = np.setdiff1d(np.arange(len(dist)), test)
        acc_train = [np.mean(np.less(dist[train], t) == issame[train]) for t in thresholds]
        best = int(np.argmax(acc_train))
        accs.append(np.mean(np.less(dist[test], thresholds[best]) == issame[test]))
        chosen.append(thresholds[best])
    return np.array(accs), np.array(chosen)


def test_fold_split_matches_kfold_without_shuffle():
    assert fold_bounds(23, 10) == [(0, 3), (3, 6), (6, 9), (9, 11), (11, 13), (13, 15), (15, 17),
                                   (17, 19), (19, 21), (21, 23)]
    assert fold_bounds(6000, 10)[1] == (600, 1200)
    with pytest.raises(ValueError):
        fold_bounds(5, 10)


def test_perfectly_separable_scores_one():
    rng = np.random.default_rng(0)
    issame = np.repeat([True, False], 300)
    dist = np.where(issame, rng.uniform(0.1, 0.8, 600), rng.uniform(1.2, 3.5, 600))
    res = evaluate_embeddings(embeddings_with_distances(dist), issame, folds=10)
    assert res.accuracy == 1.0 and res.accuracy_std == 0.0
    assert res.auc == 1.0 and res.eer == 0.0
    # folds 0-4 hold only same pairs, 5-9 only different ones: VAL/FAR average the folds where defined;
    # the FAR=1e-3 threshold sits at the closest training different pair, so a held-out one may pass
    assert res.val == 1.0 and res.far < 0.01
    assert all(0.8 <= t <= 1.2 for t in res.fold_thresholds)


def test_hand_worked_two_folds():
    # fold 0 = pairs 0,1: same 0.5, diff 1.5 ; fold 1 = pairs 2,3: same 0.305, diff 0.9
    # fold 0 is scored with fold 1's first best threshold 0.31 -> same 0.5 rejected -> 0.5
    # fold 1 is scored with fold 0's first best threshold 0.51 -> both right -> 1.0
    dist = np.array([0.5, 1.5, 0.305, 0.9])
    issame = np.array([True, False, True, False])
    res = evaluate_embeddings(embeddings_with_distances(dist), issame, folds=2)
    np.testing.assert_allclose(res.fold_thresholds, [0.31, 0.51])
    np.testing.assert_allclose(res.fold_accuracies, [0.5, 1.0])
    assert res.accuracy == pytest.approx(0.75) and res.accuracy_std == pytest.approx(0.25)
    assert res.best_threshold == pytest.approx(0.51)  # all pairs: (0.5, 0.9] is right, first is 0.51


def test_first_best_threshold_wins_ties():
    # thresholds in (0.205, 0.405] and in (0.605, 1.5] both get 3 of 4 right: the first one wins
    dist = np.array([0.205, 0.405, 0.605, 1.5])
    issame = np.array([True, False, True, False])
    res = evaluate_distances(dist, issame, folds=2)
    assert res.best_threshold == pytest.approx(0.21)


def test_matches_the_reference_loop_on_random_data():
    rng = np.random.default_rng(3)
    issame = rng.random(997) < 0.5
    dist = np.clip(np.where(issame, rng.normal(1.0, 0.35, 997), rng.normal(1.6, 0.3, 997)), 0, 3.99)
    res = evaluate_distances(dist, issame, folds=10)
    accs, chosen = insightface_style_accuracy(dist, issame, 10)
    np.testing.assert_allclose(res.fold_accuracies, accs)
    np.testing.assert_allclose(res.fold_thresholds, chosen)
    assert res.accuracy == pytest.approx(accs.mean()) and res.accuracy_std == pytest.approx(accs.std())
    same, diff = dist[issame], dist[~issame]
    brute_auc = np.mean((same[:, None] < diff[None, :]) + 0.5 * (same[:, None] == diff[None, :]))
    assert res.auc == pytest.approx(brute_auc)
    assert 0.0 < res.eer < 0.5


def test_threshold_at_far_with_duplicate_fars_does_not_crash():
    thresholds = np.array([0.0, 1.0, 2.0, 3.0, 4.0])
    far = np.array([0.0, 0.0, 0.5, 0.5, 1.0])
    assert threshold_at_far(far, thresholds, 0.5) == 3.0    # exact hit: largest threshold with that FAR
    assert threshold_at_far(far, thresholds, 0.25) == 1.5   # between (0.0, 1.0) and (0.5, 2.0)
    assert threshold_at_far(far, thresholds, 0.75) == 3.5
    assert threshold_at_far(far, thresholds, 1.0) == 4.0


def test_val_at_far_on_constant_different_distances():
    # every different pair at 1.2345: training FAR is 0 up to the grid point 1.234 and jumps to 1 after,
    # so thousands of thresholds share one FAR; the interpolated threshold lies just above 1.234
    issame = np.tile([True, False], 200)
    dist = np.where(issame, 0.3, 1.2345)
    res = evaluate_distances(dist, issame, folds=10)
    assert res.val == 1.0 and res.far == 0.0 and res.val_std == 0.0


def test_val_is_zero_when_far_target_is_unreachable():
    # different pairs are opposite vectors (distance 4): no threshold below 4 accepts any -> threshold 0
    issame = np.tile([True, False], 50)
    res = evaluate_distances(np.where(issame, 0.5, 4.0), issame, folds=5)
    assert res.val == 0.0 and res.far == 0.0 and res.accuracy == 1.0


def test_auc_and_eer_hand_worked_with_ties():
    dist = np.array([0.1, 0.2, 0.3, 0.4])
    issame = np.array([True, False, True, False])
    assert roc_auc(dist, issame) == pytest.approx(0.75)
    assert equal_error_rate(roc_curve(dist, issame)) == pytest.approx(0.5)
    tied = np.array([0.2, 0.2])
    assert roc_auc(tied, np.array([True, False])) == pytest.approx(0.5)
    roc = roc_curve(tied, np.array([True, False]))
    np.testing.assert_allclose(roc.fpr, [0, 1]) and np.testing.assert_allclose(roc.tpr, [0, 1])


def test_pair_distances_normalise_and_handle_zero_rows():
    emb = np.array([[3.0, 0.0], [0.0, 2.0], [0.0, 0.0], [1.0, 0.0]])
    np.testing.assert_allclose(pair_distances(emb), [2.0, 1.0])


@pytest.mark.parametrize("dist, issame, match", [
    (np.array([0.1, 0.2]), np.array([True, True]), "both same-identity and different"),
    (np.array([0.1, np.nan]), np.array([True, False]), "non-finite"),
    (np.array([0.1, 0.2, 0.3]), np.array([True, False]), "3 distances for 2 pairs"),
])
def test_bad_inputs_raise(dist, issame, match):
    with pytest.raises(ValueError, match=match):
        evaluate_distances(dist, issame, folds=2)


def test_embedding_count_must_be_twice_the_pairs():
    with pytest.raises(ValueError, match="5 embeddings for 3 pairs"):
        evaluate_embeddings(np.ones((5, 4)), np.array([True, False, True]))
