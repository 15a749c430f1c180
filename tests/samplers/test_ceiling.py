"""The selection rule's similarity ceiling: semi-hard negatives only (FaceNet's rule, per query)."""

import numpy as np
import pytest

from hfs.samplers.selection import SelectionRule
from hfs.samplers.shards import rule_from_fields, rule_to_fields

LABELS = np.array([0, 1])
IDS = np.array([[5, 6, 7], [8, 9, -1]])
SIMS = np.array([[0.9, 0.5, 0.3], [0.45, 0.2, -np.inf]], dtype=np.float32)
OWN = {0: 0.6, 1: 0.4}  # each query's similarity with its own class


def _scorer(ids):
    ids = np.asarray(ids)
    assert ids.shape == (2, 1), "the rule scores only the queries' own classes"
    return np.array([[OWN[int(ids[0, 0])]], [OWN[int(ids[1, 0])]]], dtype=np.float32)


def test_candidates_above_the_own_class_are_skipped_and_counted():
    rule = SelectionRule(6, ceiling="positive")
    chosen = rule.select(LABELS, IDS, SIMS, 100, 0, scorer=_scorer)
    # 5 (0.9 > 0.6) and 8 (0.45 > 0.4) are skipped; round-robin of the rest: 6, 9, then 7
    assert chosen.active[:2].tolist() == [0, 1]
    assert chosen.active[2:5].tolist() == [6, 9, 7]
    assert chosen.active[5] not in (5, 8)  # the last slot is a uniform fill
    assert chosen.stats["ceiling_dropped"] == pytest.approx(2 / 5)


def test_margin_moves_the_bar_and_off_keeps_everything():
    loose = SelectionRule(6, ceiling="positive", ceiling_margin=0.1).select(LABELS, IDS, SIMS, 100, 0, scorer=_scorer)
    assert loose.active[2:6].tolist() == [6, 8, 7, 9]  # 8 (0.45 < 0.4 + 0.1) is back, 5 still out
    plain = SelectionRule(6).select(LABELS, IDS, SIMS, 100, 0)
    assert plain.active[2:6].tolist() == [5, 8, 6, 9] and "ceiling_dropped" not in plain.stats


def test_a_query_without_a_positive_here_keeps_its_candidates():
    labels = np.array([0, -1])
    rule = SelectionRule(6, ceiling="positive")
    chosen = rule.select(labels, IDS, SIMS, 100, 0, scorer=lambda ids: np.full((1, 1), 0.6, np.float32))
    assert 8 in chosen.active and 5 not in chosen.active


def test_a_ceiling_without_scores_or_scorer_is_refused():
    rule = SelectionRule(6, ceiling="positive")
    with pytest.raises(ValueError, match="ceiling needs"):
        rule.select(LABELS, IDS, SIMS, 100, 0)
    with pytest.raises(ValueError, match="ceiling needs"):
        rule.select(LABELS, IDS, None, 100, 0, scorer=_scorer)
    # no candidates (uniform step, or no index yet): nothing to compare, no scorer needed
    assert len(rule.select(LABELS, None, None, 100, 0).active) == 6


def test_bad_values_and_the_wire_form():
    with pytest.raises(ValueError, match="ceiling must be one of off, positive"):
        SelectionRule(6, ceiling="always")
    with pytest.raises(ValueError, match="ceiling_margin must be a finite number"):
        SelectionRule(6, ceiling_margin=float("nan"))
    rule = SelectionRule(6, ceiling="positive", ceiling_margin=-0.05)
    assert rule_from_fields(rule_to_fields(rule)) == rule


def _store_with(rows):
    from hfs.paramserver.base import HParams
    from hfs.paramserver.store import InProcessStore

    store = InProcessStore()
    store.create("fc", len(rows), rows.shape[1], init="zeros")
    store.set_rows("fc", np.arange(len(rows)), rows)
    store.set_hparams("fc", HParams(lr=0.0, momentum=0.0, weight_decay=0.0))
    return store


@pytest.mark.parametrize("sampler", ["exact", "hnsw"])
def test_the_store_skips_classes_closer_than_the_own_one_under_its_current_rows(sampler):
    """The query is e0; its own class 0 scores 0.6. Class 1 scores 1.0: never a hard negative.
    Class 2 scored 0.4 when the index was built and 1.0 now: an index that answers from stale
    rows (hnsw) is re-scored by the store, so class 2 is skipped too; the rest score < 0.2."""
    from hfs.config import load_config
    from hfs.samplers import index_spec

    rng = np.random.default_rng(0)
    rows = rng.standard_normal((50, 8)).astype(np.float32)
    rows[:, 0] = 0.0
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    rows[3:, 0] = rng.uniform(-0.2, 0.2, 47)
    e0 = np.eye(8, dtype=np.float32)[0]
    rows[0] = 0.6 * e0 + 0.8 * np.eye(8, dtype=np.float32)[1]
    rows[1] = e0
    rows[2] = 0.4 * e0 + 0.9165 * np.eye(8, dtype=np.float32)[2]
    store = _store_with(rows)
    cfg = load_config(None, [f"sampler.type={sampler}", "sampler.background=false", "sampler.update_budget=0"])
    store.attach_index("fc", index_spec(cfg.sampler, "cosine", seed=0))
    store.set_rows("fc", np.array([2]), e0[None, :])  # after the build: a stale index still holds the old row
    rule = SelectionRule(10, ceiling="positive")
    chosen, _ = store.select("fc", e0[None, :], np.array([0]), 0, rule, 6)
    hard = chosen.active[1:][chosen.log_q[1:] == 0.0]  # picked with certainty: the index's candidates
    assert hard.size >= 3 and 1 not in hard and 2 not in hard  # (a uniform fill may still draw them)
    assert chosen.stats["ceiling_dropped"] == pytest.approx(2 / 6)


def test_reranked_orders_each_querys_candidates_by_their_fresh_scores():
    from hfs.samplers.selection import reranked

    ids = np.array([[4, 5, -1, 6], [7, 8, 9, 1]])
    fresh = np.array([[0.1, 0.5, 9.0, 0.3], [0.2, 0.2, 0.9, -0.5]])
    got_ids, got = reranked(ids, fresh)
    assert got_ids.tolist() == [[5, 6, 4, -1], [9, 7, 8, 1]]  # ties keep the index's order; -1 last
    assert got[0, -1] == -np.inf and got[1, 0] == pytest.approx(0.9)


def test_a_stale_index_hands_the_rule_its_candidates_in_their_order_now():
    """hnsw built when class 5 was the query's nearest; class 5 has since moved far and class 9 close:
    re-ranked under the current rows, 9 comes first and 5 last."""
    from hfs.config import load_config
    from hfs.samplers import index_spec
    from hfs.samplers.owned import OwnedIndex
    from hfs.samplers.base import array_chunks, normalise_rows
    from hfs.samplers.selection import score_with_rows

    rng = np.random.default_rng(3)
    rows = normalise_rows(rng.standard_normal((40, 8)).astype(np.float32))
    rows[9] = normalise_rows((rows[5] + 0.4 * rows[20])[None, :])[0]  # the query's second nearest
    query = rows[5]
    cfg = load_config(None, ["sampler.type=hnsw", "sampler.background=false"])
    index = OwnedIndex(index_spec(cfg.sampler, "cosine", seed=0), rows.shape, lambda: array_chunks(rows, 16))
    now = rows.copy()
    now[9], now[5] = rows[5], -rows[5]
    scorer = lambda ids: score_with_rows(normalise_rows(query[None, :]), ids, lambda u: normalise_rows(now[u]))
    stale_ids, _ = index.answer(query[None, :], 4, scorer)
    fresh_ids, fresh = index.answer(query[None, :], 4, scorer, fresh=True)
    assert stale_ids[0, 0] == 5 and 9 in stale_ids[0]
    assert fresh_ids[0, 0] == 9 and fresh_ids[0, -1] == 5 and np.all(np.diff(fresh[0]) <= 0)
    index.close()


def test_a_query_asks_for_candidates_once_its_class_beats_the_random_ones():
    """ready_probe: query 0's own class (0.9) beats every drawn class (at most 0.5), query 1's (0.3) does
    not; only query 0 is searched, query 1 gets uniform negatives, and the share is reported."""
    from hfs.samplers.selection import find_candidates

    own = {0: 0.9, 1: 0.3}

    def scorer(ids):
        ids = np.asarray(ids)
        if ids.ndim == 2:  # the queries' own classes
            return np.array([[own[int(ids[0, 0])]], [own[int(ids[1, 0])]]], dtype=np.float32)
        return np.full((2, ids.size), 0.5, dtype=np.float32)

    searched = []

    def search(asking):
        searched.append(asking.copy())
        return np.array([[7, 8]]), np.array([[0.6, 0.4]], dtype=np.float32)

    rule = SelectionRule(6, ceiling="positive", ready_probe=16)
    features = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    ids, sims, measured = find_candidates(rule, LABELS, features, 100, 0, search, scorer)
    assert len(searched) == 1 and searched[0].tolist() == [[1.0, 0.0]]
    assert ids.tolist() == [[7, 8], [-1, -1]] and measured == {"ready_share": 0.5}
    chosen = rule.select(LABELS, ids, sims, 100, 0, scorer, measured)
    assert chosen.active[2:4].tolist() == [7, 8] and chosen.stats["ready_share"] == 0.5
    # before hard_after nobody asks and the index is not searched at all
    late = SelectionRule(6, ceiling="positive", ready_probe=16, hard_after=5)
    assert find_candidates(late, LABELS, features, 100, 0, search, scorer)[0] is None and len(searched) == 1
    with pytest.raises(ValueError, match="ready_probe needs a scorer"):
        find_candidates(rule, LABELS, features, 100, 0, search, None)


@pytest.mark.parametrize("ceiling, fresh", [("positive", True), ("off", False)])
def test_only_a_rule_that_compares_candidates_has_them_re_scored(monkeypatch, ceiling, fresh):
    """Re-scoring a stale index's candidates costs a read of every candidate row: the store asks for it
    when the ceiling compares them with the query's class, not for the readiness test alone."""
    from hfs.config import load_config
    from hfs.samplers import index_spec
    from hfs.samplers.owned import OwnedIndex

    rows = np.eye(8, dtype=np.float32)[np.arange(40) % 8] + 0.01 * np.arange(40, dtype=np.float32)[:, None]
    store = _store_with(rows)
    cfg = load_config(None, ["sampler.type=hnsw", "sampler.background=false"])
    store.attach_index("fc", index_spec(cfg.sampler, "cosine", seed=0))
    asked = []
    answer = OwnedIndex.answer

    def recording(self, features, k, scorer=None, *, fresh=False):
        asked.append(fresh)
        return answer(self, features, k, scorer, fresh=fresh)

    monkeypatch.setattr(OwnedIndex, "answer", recording)
    rule = SelectionRule(10, ceiling=ceiling, ready_probe=2)
    store.select("fc", rows[:2].copy(), np.array([0, 1]), 0, rule, 4)
    assert asked and set(asked) == {fresh}
