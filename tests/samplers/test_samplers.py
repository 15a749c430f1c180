import numpy as np
import pytest

from hfs.config import load_config
from hfs.samplers import SAMPLERS, build_sampler
from hfs.samplers.base import array_chunks, normalise_rows

K = 10
# Recall@10 against exact search on the small structured case (20 trees for annoy); the
# floors sit below what is reached (annoy ~0.8 cosine / ~0.65 dot: its dot metric works
# through an extra augmented dimension; hnsw ~1.0) so that they fail only on a real bug.
FLOORS = {("annoy", "cosine"): 0.7, ("annoy", "dot"): 0.55, ("hnsw", "cosine"): 0.9, ("hnsw", "dot"): 0.9,
          ("ivf", "cosine"): 0.7, ("ivf", "dot"): 0.7, ("exact", "cosine"): 1.0, ("exact", "dot"): 1.0}


def _exact_topk(weights, queries, metric):
    w = normalise_rows(weights) if metric == "cosine" else weights
    q = normalise_rows(queries) if metric == "cosine" else queries
    return np.argsort(-(q @ w.T), axis=1)[:, :K]


def _recall(cands, truth):
    return np.mean([np.intersect1d(c, t).size / K for c, t in zip(cands, truth)])


def _built(name, weights, metric="cosine", **overrides):
    cfg = load_config(None, [f"sampler.{k}={v}" for k, v in overrides.items()])
    sampler = build_sampler(name, cfg.sampler, metric)
    sampler.rebuild(array_chunks(weights, 700), *weights.shape)
    return sampler


@pytest.mark.parametrize("name", ["annoy", "hnsw", "ivf", "exact"])
@pytest.mark.parametrize("metric", ["cosine", "dot"])
def test_recall_on_structured_weights_is_above_floor(name, metric, small_world):
    weights, _, queries = small_world
    if metric == "dot":  # rows of different norms, so dot and cosine rankings differ
        weights = weights * np.random.default_rng(2).uniform(0.5, 1.5, (len(weights), 1)).astype(np.float32)
    sampler = _built(name, weights, metric, annoy_trees=20)
    cands = sampler.candidates(queries, K)
    assert cands.shape == (len(queries), K) and cands.dtype == np.int64
    assert _recall(cands, _exact_topk(weights, queries, metric)) >= FLOORS[name, metric]
    sampler.close()


def test_random_sampler_has_no_candidates(small_world):
    weights, _, queries = small_world
    sampler = _built("random", weights)
    assert sampler.candidates(queries, K).shape == (len(queries), 0)


@pytest.mark.parametrize("name", ["hnsw", "ivf", "exact"])
def test_in_place_update_moves_a_row(name, small_world):
    weights, _, queries = small_world
    sampler = _built(name, weights)
    target = int(np.argsort(-(normalise_rows(weights) @ queries[0]))[-1])  # the least similar class
    assert target not in sampler.candidates(queries[:1], K)[0]
    moved = [target, (target + 1) % len(weights)]
    assert sampler.update_rows(np.array(moved), np.stack([queries[0], weights[moved[1]]]))
    cands = sampler.candidates(queries[:1], K)[0]
    assert cands[0] == target
    assert len(set(cands.tolist())) == K  # the old element is gone, not returned twice


def test_annoy_cannot_update_in_place_and_save_load_round_trips(small_world, tmp_path):
    weights, _, queries = small_world
    sampler = _built("annoy", weights, annoy_trees=10)
    assert not sampler.update_rows(np.array([0]), weights[:1])
    before = sampler.candidates(queries, K)
    sampler.save(tmp_path / "a.ann")
    again = SAMPLERS.build("annoy", **sampler.spec())
    again.load(tmp_path / "a.ann", *weights.shape)
    np.testing.assert_array_equal(again.candidates(queries, K), before)
    sampler.close()
    again.close()


def test_k_larger_than_class_count_pads_with_minus_one():
    weights = np.eye(4, dtype=np.float32)
    for name in ("annoy", "hnsw", "exact"):
        cands = _built(name, weights).candidates(weights[:2], 6)
        assert cands.shape == (2, 6)
        assert (cands[:, 4:] == -1).all() and sorted(cands[0, :4].tolist()) == [0, 1, 2, 3]


def test_unknown_sampler_names_suggest_the_nearest():
    cfg = load_config()
    with pytest.raises(KeyError, match="did you mean 'hnsw'"):
        build_sampler("hnws", cfg.sampler, "cosine")


@pytest.mark.parametrize("threads", [2, 3, 64])
def test_annoy_threaded_queries_answer_exactly_as_one_thread(threads, small_world):
    """Splitting a batch over threads (annoy releases the GIL per query) changes no answer."""
    weights, _, queries = small_world
    one = _built("annoy", weights, annoy_trees=10, query_threads=1)
    many = _built("annoy", weights, annoy_trees=10, query_threads=threads)
    expected = one.candidates(queries, K)
    for _ in range(2):  # the pool is reused across batches
        np.testing.assert_array_equal(many.candidates(queries, K), expected)
    np.testing.assert_array_equal(many.candidates(queries[:1], K), expected[:1])
    many.close()
    many.close()  # idempotent, pool included
    one.close()


@pytest.mark.parametrize("name", ["annoy", "hnsw", "ivf", "exact"])
@pytest.mark.parametrize("metric", ["cosine", "dot"])
def test_search_similarities_are_the_true_ones_best_first(name, metric, small_world):
    """Shards merge answers by similarity, so every index must report the same quantity."""
    weights, _, queries = small_world
    weights = weights * np.random.default_rng(3).uniform(0.5, 1.5, (len(weights), 1)).astype(np.float32)
    ids, sims = _built(name, weights, metric, annoy_trees=20).search(queries, K)
    assert ids.shape == sims.shape == (len(queries), K) and sims.dtype == np.float32
    w = normalise_rows(weights) if metric == "cosine" else weights
    q = normalise_rows(queries) if metric == "cosine" else queries
    found = ids >= 0
    truth = np.take_along_axis(q @ w.T, np.where(found, ids, 0), axis=1)
    np.testing.assert_allclose(sims[found], truth[found], atol=2e-3, rtol=2e-3)
    assert np.all(np.diff(np.where(found, sims, -np.inf), axis=1)[found[:, 1:]] <= 1e-4)
    assert np.all(np.isneginf(sims[~found]))


def test_random_sampler_searches_nothing():
    ids, sims = build_sampler("random", load_config(None, []).sampler, "cosine").search(np.ones((3, 4), np.float32), 5)
    assert ids.shape == sims.shape == (3, 0)


def test_ivf_without_faiss_is_a_one_line_error_naming_the_install(small_world, monkeypatch):
    import sys

    from hfs.utils.errors import HfsError

    monkeypatch.setitem(sys.modules, "faiss", None)  # what an install without faiss-cpu sees
    with pytest.raises(HfsError, match="sampler 'ivf' needs the faiss package: pip install faiss-cpu"):
        _built("ivf", small_world[0])


def test_ivf_reads_back_what_it_holds_and_sizes_its_lists():
    from hfs.samplers.ivf import auto_nlist

    assert auto_nlist(1_000_000) == 1000 and auto_nlist(2000) == 45 and auto_nlist(10) == 1
    weights = np.random.default_rng(0).standard_normal((500, 8)).astype(np.float32)
    sampler = _built("ivf", weights)
    np.testing.assert_allclose(sampler.indexed_rows(np.array([4, 2])), normalise_rows(weights[[4, 2]]), atol=1e-6)
    assert sampler.indexed_rows(np.array([], dtype=np.int64)).shape == (0, 8)
