import numpy as np
import pytest

from hfs.samplers.selection import auto_neighbours, select_active_classes


def _check(active, local, labels, sample_num):
    assert active.dtype == np.int64 and local.dtype == np.int64
    assert len(active) == sample_num
    assert len(np.unique(active)) == len(active)
    np.testing.assert_array_equal(active[local], labels)


def test_positives_first_sorted_then_negatives_in_rank_order_then_fill():
    labels = np.array([7, 3, 7, 9])
    cands = np.array([[7, 11, 12], [3, 13, 11], [7, 14, 15], [9, 16, 17]])
    active, local = select_active_classes(labels, cands, 8, 100, np.random.default_rng(0))
    _check(active, local, labels, 8)
    assert active[:3].tolist() == [3, 7, 9]
    # rank 1 of every query first (11, 13, 14, 16), then rank 2 (12, ...): only 5 slots left
    assert active[3:8].tolist() == [11, 13, 14, 16, 12]


def test_uniform_fill_when_candidates_run_out():
    labels = np.array([1, 2])
    cands = np.array([[5, -1], [-1, -1]])
    active, local = select_active_classes(labels, cands, 10, 50, np.random.default_rng(0))
    _check(active, local, labels, 10)
    assert active[:3].tolist() == [1, 2, 5]


@pytest.mark.parametrize("cands", [None, np.empty((3, 0), dtype=np.int64), np.full((3, 4), -1)])
def test_empty_candidates_give_positives_plus_uniform(cands):
    labels = np.array([4, 4, 0])
    active, local = select_active_classes(labels, cands, 6, 1_000_000, np.random.default_rng(1))
    _check(active, local, labels, 6)
    assert active[:2].tolist() == [0, 4]


def test_duplicate_candidates_and_candidates_equal_to_positives_are_dropped():
    labels = np.array([0, 1, 2])
    cands = np.array([[1, 5, 5], [0, 5, 6], [2, 6, 1]])
    active, local = select_active_classes(labels, cands, 5, 10, np.random.default_rng(0))
    _check(active, local, labels, 5)
    assert active.tolist() == [0, 1, 2, 5, 6]


def test_sample_num_at_least_num_classes_gives_all_classes():
    labels = np.array([3, 0, 3])
    active, local = select_active_classes(labels, np.array([[1], [2], [9]]), 20, 10, np.random.default_rng(0))
    np.testing.assert_array_equal(active, np.arange(10))
    np.testing.assert_array_equal(local, labels)


def test_more_distinct_labels_than_sample_num_keeps_every_positive():
    labels = np.arange(12)[::-1]
    active, local = select_active_classes(labels, None, 5, 100, np.random.default_rng(0))
    np.testing.assert_array_equal(active, np.arange(12))
    np.testing.assert_array_equal(active[local], labels)


def test_seeded_fill_is_deterministic_and_covers_small_and_huge_class_counts():
    labels = np.array([5, 6, 7])
    for num_classes in (40, 5_000_000):
        a = select_active_classes(labels, None, 30, num_classes, np.random.default_rng(3))
        b = select_active_classes(labels, None, 30, num_classes, np.random.default_rng(3))
        c = select_active_classes(labels, None, 30, num_classes, np.random.default_rng(4))
        np.testing.assert_array_equal(a[0], b[0])
        assert not np.array_equal(a[0], c[0])
        _check(*a, labels, 30)
        assert a[0].max() < num_classes and a[0].min() >= 0


def test_fill_can_take_every_remaining_class():
    labels = np.array([0, 1])
    active, local = select_active_classes(labels, None, 9, 10, np.random.default_rng(0))
    _check(active, local, labels, 9)


def test_out_of_range_labels_and_candidates():
    with pytest.raises(ValueError, match="label 10"):
        select_active_classes(np.array([10]), None, 3, 10, np.random.default_rng(0))
    active, _ = select_active_classes(np.array([1]), np.array([[99, 2]]), 3, 10, np.random.default_rng(0))
    assert 99 not in active and active[1] == 2


def test_large_batch_is_vectorised_and_correct():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 100_000, 4096)
    cands = rng.integers(-1, 100_000, (4096, 9))
    active, local = select_active_classes(labels, cands, 8000, 100_000, rng)
    _check(active, local, labels, 8000)


def test_auto_neighbours():
    assert auto_neighbours(1000, 256, 10**6) == 9
    assert auto_neighbours(1000, 256, 5) == 5
    assert auto_neighbours(10, 256, 100) == 3


def test_queries_without_a_positive_here_add_candidates_but_no_positive():
    """-1 labels: the sharded classifier's samples whose class lives on another rank."""
    labels = np.array([-1, 4, -1])
    cands = np.array([[7, 8], [4, 9], [2, 7]])
    active, local = select_active_classes(labels, cands, 5, 20, np.random.default_rng(0))
    assert active.tolist() == [4, 7, 2, 8, 9]  # the -1 queries rank with the others, round-robin
    assert local.tolist() == [-1, 0, -1]
    everything, same = select_active_classes(labels, cands, 20, 20, np.random.default_rng(0))
    np.testing.assert_array_equal(everything, np.arange(20))
    assert same.tolist() == [-1, 4, -1]
    with pytest.raises(ValueError, match="label -2"):
        select_active_classes(np.array([-2]), None, 3, 10, np.random.default_rng(0))
