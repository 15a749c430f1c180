"""The store owns the index over its rows: select from it, drift where pushes land, shards merge by score."""

import numpy as np
import pytest

from hfs.paramserver.base import HParams
from hfs.paramserver.sharding import ShardSpec
from hfs.paramserver.store import InProcessStore, StoreError
from hfs.samplers.owned import IndexSpec
from hfs.samplers.selection import SelectionRule
from hfs.samplers.shards import merge_topk

C, D, B = 300, 16, 12


def _spec(sampler="exact", **kw):
    kwargs = {"exact": {"metric": "cosine", "chunk": 64, "device": "cpu"}, "hnsw": {"metric": "cosine", "seed": 0},
              "annoy": {"metric": "cosine", "trees": 4, "seed": 0}, "random": {"metric": "cosine"}}[sampler]
    return IndexSpec(sampler=sampler, kwargs=kwargs, **{"background": False, "refresh": "interval", **kw})


def _store(shard=ShardSpec(), seed=3):
    store = InProcessStore(None, shard=shard)
    store.create("fc", C, D, init="gaussian", std=0.5, seed=seed)
    store.set_hparams("fc", HParams(lr=0.5, momentum=0.9))
    return store


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((B, D)).astype(np.float32), rng.integers(0, C, B).astype(np.int64)


def test_select_uses_the_store_index_and_returns_the_rows():
    store = _store()
    assert store.attach_index("fc", _spec())
    features, labels = _batch()
    rule = SelectionRule(40, seed=5)
    chosen, values = store.select("fc", features, labels, 0, rule, 7)
    weight = np.concatenate([rows for _, rows in store.iter_chunks("fc")])
    unit = weight / np.linalg.norm(weight, axis=1, keepdims=True)
    q = features / np.linalg.norm(features, axis=1, keepdims=True)
    best = np.argsort(-(q @ unit.T), axis=1, kind="stable")[:, :7]
    expected = rule.select(labels, best, None, C, 0)
    np.testing.assert_array_equal(chosen.active, expected.active)
    np.testing.assert_array_equal(chosen.local, expected.local)
    np.testing.assert_array_equal(values, weight[chosen.active])
    assert (chosen.active[chosen.local] == labels).all()
    assert store.index_stats("fc")["builds"] == 1 and store.stats()["indexes"]["fc"]["index_ready"]


def test_attach_is_idempotent_for_an_equal_spec_and_replaces_a_different_one():
    store = _store()
    assert store.attach_index("fc", _spec()) is True
    assert store.attach_index("fc", _spec()) is False  # a second trainer of the same job
    assert store.stats()["index_attaches"] == 1
    assert store.attach_index("fc", _spec(interval=7)) is True
    assert store.stats()["index_attaches"] == 2
    with pytest.raises(StoreError, match="no matrix named 'nope'"):
        store.attach_index("nope", _spec())


def test_selection_falls_back_to_uniform_negatives_while_no_index_is_ready():
    store = _store()
    store.attach_index("fc", _spec("hnsw", background=True))
    features, labels = _batch(1)
    rule = SelectionRule(50, seed=2)
    assert not store.index_stats("fc")["index_ready"]
    chosen, _ = store.select("fc", features, labels, 0, rule, 9)
    uniform = rule.select(labels, None, None, C, 0)
    np.testing.assert_array_equal(chosen.active, uniform.active)
    store.close()


def test_drift_is_measured_where_the_pushes_are_applied_and_builds_follow_the_policy():
    store = _store()
    store.attach_index("fc", _spec("hnsw", interval=2, update_budget=0))
    rng = np.random.default_rng(0)
    rows = np.arange(0, C, 3)
    for step in range(5):
        store.push_grads("fc", rows, rng.standard_normal((rows.size, D)).astype(np.float32) * 5, step)
        if step == 0:
            assert store.index_stats("fc")["drift"] > 0  # measured in the store, no trainer involved
    assert store.index_stats("fc")["builds"] == 3  # at attach, then at steps 2 and 4 (interval 2)


def test_restore_rebuilds_the_index_which_is_never_saved(tmp_path):
    store = InProcessStore(tmp_path)
    store.create("fc", C, D, seed=1)
    store.attach_index("fc", _spec())
    name = store.snapshot()
    assert not any("index" in p.name for p in (tmp_path / name).iterdir())
    store.restore(name)
    assert store.index_stats("fc")["index_ready"] and store.index_stats("fc")["builds"] == 1


@pytest.mark.parametrize("count", [1, 2, 3])
def test_shards_merged_by_score_give_the_single_store_active_set(count):
    whole = _store()
    whole.attach_index("fc", _spec())
    shards = [_store(ShardSpec(i, count)) for i in range(count)]
    for shard in shards:
        shard.attach_index("fc", _spec())
    rule, k = SelectionRule(60, seed=9), 8
    for seed in range(3):
        features, labels = _batch(seed)
        expected, _ = whole.select("fc", features, labels, seed, rule, k)
        ids, sims = merge_topk([shard.try_search("fc", features, k, seed) for shard in shards], k)
        merged = rule.select(labels, ids, sims, C, seed)
        np.testing.assert_array_equal(merged.active, expected.active)
        np.testing.assert_array_equal(merged.local, expected.local)


def test_merge_topk_ranks_by_similarity_and_drops_missing():
    a = (np.array([[4, 2, -1]]), np.array([[0.9, 0.5, -np.inf]], dtype=np.float32))
    b = (np.array([[7, 8]]), np.array([[0.95, 0.1]], dtype=np.float32))
    ids, sims = merge_topk([a, b], 3)
    assert ids.tolist() == [[7, 4, 2]] and sims[0, 0] == pytest.approx(0.95)
    assert merge_topk([a, (np.empty((1, 0), np.int64), np.empty((1, 0), np.float32))], 5)[0].tolist() == [[4, 2, -1]]


@pytest.mark.parametrize("bad", [
    dict(features=np.full((B, D), np.nan, dtype=np.float32)),
    dict(features=np.zeros((B, D + 1), dtype=np.float32)),
    dict(features=np.zeros((B, D), dtype=np.float64)),
    dict(labels=np.zeros(B + 1, dtype=np.int64)),
    dict(labels=np.full(B, C, dtype=np.int64)),
    dict(k=C + 1), dict(k=-1), dict(k=2**40),
])
def test_a_bad_select_is_refused_and_changes_nothing(bad):
    store = _store()
    store.attach_index("fc", _spec())
    before = store.stats()
    features, labels = _batch()
    args = dict(features=features, labels=labels, k=5, **{})
    args.update(bad)
    with pytest.raises(StoreError):
        store.select("fc", args["features"], args["labels"], 0, SelectionRule(30), args["k"])
    after = store.stats()
    assert after["selects"] == before["selects"] and after["indexes"]["fc"]["builds"] == 1
    chosen, _ = store.select("fc", features, labels, 0, SelectionRule(30), 5)
    assert len(chosen.active) == 30


def test_select_answers_with_the_rows_before_writing_them_back():
    """``answer`` gets the selection and the caught-up rows once; the store ends as without it."""
    stores = [_store(), _store()]
    features, labels = _batch(4)
    rule = SelectionRule(40, seed=5)
    for store in stores:
        store.attach_index("fc", _spec())
        for step in range(3):  # rows fall behind: the read catches them up
            store.push_grads("fc", labels[:step + 2], np.ones((step + 2, D), np.float32), step)
    seen = []
    got = stores[0].try_select("fc", features, labels, 3, rule, 7, answer=lambda c, v: seen.append((c, v.copy())))
    want = stores[1].try_select("fc", features, labels, 3, rule, 7)
    assert len(seen) == 1
    for chosen, values in (seen[0], got):
        np.testing.assert_array_equal(chosen.active, want[0].active)
        np.testing.assert_array_equal(values, want[1])
    every = np.arange(C)
    np.testing.assert_array_equal(stores[0].get_rows("fc", every), stores[1].get_rows("fc", every))
