"""The confusion memory: candidates by label, learning from fresh scores, snapshots, in the store."""

import numpy as np
import pytest

from hfs.samplers.memory import MemorySampler


def _memory(classes=20, slots=3, hops=2, explore=4, symmetric=False):
    mem = MemorySampler(slots=slots, hops=hops, explore=explore, symmetric=symmetric)
    mem.rebuild((), classes, 4)
    return mem


def _table_scorer(table):
    """Scores from a fixed (B, C) table, as a store's scorer answers them."""
    def score(ids):
        ids = np.asarray(ids)
        if ids.ndim == 1:
            return table[:, ids]
        return np.where(ids >= 0, np.take_along_axis(table, np.maximum(ids, 0), 1), -np.inf)
    return score


def test_learn_keeps_each_class_best_scored_members_without_itself():
    mem = _memory()
    labels = np.array([2, 2, 5])
    ids = np.array([[2, 7, 8, 9], [7, 10, 11, -1], [1, 3, 4, 6]])
    scores = np.array([[0.9, 0.5, 0.1, 0.3], [0.6, 0.8, 0.0, 0.0], [0.2, 0.4, 0.7, 0.1]], dtype=np.float32)
    mem.learn(labels, ids, scores)
    # class 2: its own id dropped; 7 scored twice keeps its best (0.6); best 3 of 10 0.8, 7 0.6, 9 0.3, 8 0.1
    assert mem.ids[2].tolist() == [10, 7, 9]
    np.testing.assert_allclose(mem.scores[2], [0.8, 0.6, 0.3])
    assert mem.ids[5].tolist() == [4, 3, 1]
    assert (mem.ids[[0, 1, 3]] == -1).all()


def test_symmetric_learning_teaches_the_candidates_classes_too():
    mem = _memory(symmetric=True)
    mem.learn(np.array([2]), np.array([[7, 8]]), np.array([[0.9, 0.2]], dtype=np.float32))
    assert mem.ids[2].tolist() == [7, 8, -1]
    assert mem.ids[7].tolist() == [2, -1, -1] and mem.ids[8].tolist() == [2, -1, -1]
    np.testing.assert_allclose(mem.scores[7, 0], 0.9)


def test_fresh_scores_replace_remembered_ones_and_unscored_members_keep_theirs():
    mem = _memory()
    mem.learn(np.array([1]), np.array([[4, 5, 6]]), np.array([[0.9, 0.8, 0.7]], dtype=np.float32))
    # 4 drifted away (fresh low score), 6 was not scored now, 12 is new
    mem.learn(np.array([1]), np.array([[4, 12]]), np.array([[0.1, 0.75]], dtype=np.float32))
    assert mem.ids[1].tolist() == [5, 12, 6]
    np.testing.assert_allclose(mem.scores[1], [0.8, 0.75, 0.7])


def test_candidates_are_members_then_members_of_members():
    mem = _memory(slots=2)
    mem.ids[3] = [5, 6]
    mem.ids[5] = [7, -1]
    mem.ids[6] = [3, 8]
    cands = mem.candidates(np.array([3, -1]))
    assert cands[0].tolist() == [5, 6, 7, -1, 3, 8]
    assert (cands[1] == -1).all()
    assert _memory(slots=2, hops=1).candidates(np.array([0])).shape == (1, 2)


def test_search_labels_ranks_by_fresh_score_drops_own_class_and_learns():
    mem = _memory(classes=10, slots=2)
    mem.ids[3] = [5, 6]
    mem.ids[5] = [3, 7]  # 3 is the query's own class: never a candidate
    table = np.zeros((1, 10), dtype=np.float32)
    table[0, [5, 6, 7, 3]] = [0.2, 0.1, 0.6, 0.99]
    ids, scores = mem.search_labels(np.array([3]), 3, _table_scorer(table))
    assert ids[0].tolist() == [7, 5, 6]
    np.testing.assert_allclose(scores[0], [0.6, 0.2, 0.1])
    assert mem.ids[3].tolist() == [7, 5]  # learnt from what it just scored


def test_explore_learns_from_uniformly_drawn_classes():
    mem = _memory(classes=50, slots=2, explore=200)
    table = np.zeros((1, 50), dtype=np.float32)
    table[0, [17, 31]] = [0.9, 0.8]
    mem.explore_and_learn(np.array([4]), _table_scorer(table))
    assert mem.ids[4].tolist() == [17, 31]  # 200 draws of 50 classes find both
    _memory(explore=0).explore_and_learn(np.array([4]), _table_scorer(table))  # nothing to do, no error


def test_state_round_trip_and_shape_check():
    mem = _memory()
    mem.learn(np.array([0]), np.array([[1, 2]]), np.array([[0.5, 0.4]], dtype=np.float32))
    other = _memory()
    other.load_state(mem.state())
    np.testing.assert_array_equal(other.ids, mem.ids)
    with pytest.raises(ValueError, match="shape"):
        _memory(classes=5).load_state(mem.state())


def test_memory_in_the_store_learns_the_classes_near_each_label():
    """Classes built in pairs (2i, 2i+1 nearly the same row): after a few steps a class's
    memory holds its pair, found by exploration alone, and select hands it out."""
    from hfs.paramserver.base import HParams
    from hfs.paramserver.store import InProcessStore
    from hfs.samplers.owned import IndexSpec
    from hfs.samplers.selection import SelectionRule

    rng = np.random.default_rng(0)
    C, D = 400, 32
    base = rng.standard_normal((C // 2, D)).astype(np.float32)
    weights = np.repeat(base, 2, axis=0) + 0.05 * rng.standard_normal((C, D)).astype(np.float32)
    store = InProcessStore()
    store.create("fc", C, D, init="zeros")
    store.set_rows("fc", np.arange(C), weights)
    store.set_hparams("fc", HParams(lr=0.0, momentum=0.0, weight_decay=0.0))
    store.attach_index("fc", IndexSpec("memory", {"metric": "cosine", "slots": 2, "hops": 2, "explore": 64}))
    rule = SelectionRule(40)
    labels = np.arange(0, 20, 2)  # even classes; their odd twins are the nearest classes there are
    for step in range(60):
        feats = weights[labels] + 0.01 * rng.standard_normal((labels.size, D)).astype(np.float32)
        chosen, rows = store.select("fc", feats, labels, step, rule, 3)
        store.push_grads("fc", chosen.active, np.zeros_like(rows), step)
    memory = store._indexes["fc"].sampler
    assert all(labels[i] + 1 in memory.ids[labels[i]] for i in range(labels.size))
    assert set((labels + 1).tolist()) <= set(chosen.active.tolist())


def test_the_store_saves_what_the_memory_learnt_and_restores_it_when_the_index_is_attached(tmp_path):
    from hfs.paramserver.base import HParams
    from hfs.paramserver.store import InProcessStore
    from hfs.samplers.owned import IndexSpec
    from hfs.samplers.selection import SelectionRule

    spec = IndexSpec("memory", {"metric": "cosine", "slots": 2, "hops": 2, "explore": 16})
    store = InProcessStore(tmp_path)
    store.create("fc", 100, 8, seed=1)
    store.set_hparams("fc", HParams(lr=0.1, momentum=0.9, weight_decay=0.0))
    store.attach_index("fc", spec)
    rng = np.random.default_rng(0)
    for step in range(5):
        labels = rng.integers(0, 100, 16)
        chosen, rows = store.select("fc", rng.standard_normal((16, 8)).astype(np.float32), labels, step,
                                    SelectionRule(30), 4)
        store.push_grads("fc", chosen.active, np.zeros_like(rows), step)
    learnt = store._indexes["fc"].sampler.ids.copy()
    assert (learnt >= 0).any()
    store.snapshot("s")

    fresh = InProcessStore(tmp_path)  # a resumed run: restore first, then attach the index
    fresh.restore("s")
    fresh.attach_index("fc", spec)
    np.testing.assert_array_equal(fresh._indexes["fc"].sampler.ids, learnt)

    other = InProcessStore(tmp_path)  # a memory of another size starts empty, with a warning
    other.restore("s")
    other.attach_index("fc", IndexSpec("memory", {"metric": "cosine", "slots": 3, "hops": 2, "explore": 16}))
    assert (other._indexes["fc"].sampler.ids == -1).all()
