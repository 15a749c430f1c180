import logging
import os
import time

import numpy as np
import pytest

from hfs.config import load_config
from hfs.samplers import build_selector as _build_selector
from hfs.samplers.base import normalise_rows
from hfs.samplers.refresh import DriftTracker, RefreshPolicy

C, D = 2000, 32


def build_selector(cfg, store, matrix, num_classes):
    """The selector sampled training builds from ``cfg`` (one rank, nothing capped)."""
    return _build_selector(cfg.sampler, store=store, matrix=matrix, num_classes=num_classes,
                           sample_num=cfg.fc.sample_num, queries_per_step=cfg.train.batch_size,
                           seed=cfg.sampler.seed, metric=cfg.sampler_metric)


def _cfg(**sampler):
    sets = [f"sampler.{k}={v}" for k, v in sampler.items()]
    return load_config(None, sets + ["fc.sample_num=200", "train.batch_size=64"])


def _valid(active, local, labels, sample_num=200):
    assert len(active) == sample_num and len(np.unique(active)) == sample_num
    assert active.min() >= 0 and active.max() < C
    np.testing.assert_array_equal(active[local], labels)


def _wait_swapped(selector, step, rebuilds, timeout=60.0):
    """Keep stepping maybe_refresh until the rebuild count reaches ``rebuilds``."""
    deadline = time.time() + timeout
    while selector.upkeep()["rebuilds"] < rebuilds:
        assert time.time() < deadline, "background rebuild did not finish"
        step += 1
        selector.maybe_refresh(step)
        time.sleep(0.01)
    return step


def _exact_recall(selector, weights, queries, k=10):
    truth = np.argsort(-(normalise_rows(queries) @ normalise_rows(weights).T), axis=1)[:, :k]
    cands = selector.sampler.candidates(queries, k)
    return np.mean([np.intersect1d(c, t).size / k for c, t in zip(cands, truth)])


@pytest.mark.parametrize("name", ["hnsw", "annoy"])
def test_background_refresh_swaps_safely(name, small_world, make_store):
    weights, labels, queries = small_world
    store = make_store(weights)
    selector = build_selector(_cfg(type=name, refresh="interval", interval=5, snapshot_rows=100, annoy_trees=20),
                              store, "fc", C)
    assert selector.wait_ready(timeout=60)
    assert _exact_recall(selector, weights, queries) > 0.7
    # the weights change completely: class j now has the vector class perm[j] had
    perm = np.random.default_rng(5).permutation(C)
    store.set_rows("fc", np.arange(C), weights[perm])
    queried_while_building = 0
    step = 0
    for step in range(1, 40):
        selector.maybe_refresh(step)
        building = selector.upkeep()["building"]
        active, local = selector.select(queries, labels, step)
        _valid(active, local, labels)
        queried_while_building += building
    assert queried_while_building > 0
    _wait_swapped(selector, step, selector.upkeep()["rebuilds"] + 1)
    assert _exact_recall(selector, weights[perm], queries) > 0.7
    assert _exact_recall(selector, weights, queries) < 0.2
    up = selector.upkeep()
    assert up["bg_cpu_seconds"] > 0 and up["fg_seconds"] > 0 and 0 <= up["fg_share"] <= 1
    selector.close()
    selector.close()


def test_first_index_in_background_means_uniform_negatives_until_ready(small_world, make_store):
    weights, labels, queries = small_world
    selector = build_selector(_cfg(type="annoy", annoy_trees=5), make_store(weights), "fc", C)
    assert not selector.index_ready  # the child process that builds it is still starting
    active, local = selector.select(queries, labels, 0)
    _valid(active, local, labels)
    assert selector.wait_ready(timeout=60) and selector.upkeep()["rebuilds"] == 1
    selector.close()


def test_close_during_a_background_build_stops_it(small_world, make_store):
    weights, labels, queries = small_world
    selector = build_selector(_cfg(type="annoy", annoy_trees=5), make_store(weights), "fc", C)
    build = selector.index._build
    selector.close()
    build.wait(timeout=60)
    assert not selector.index_ready
    assert build._result is None and build._error is None  # dropped quietly, not swapped in
    assert build._child is None or build._child.returncode is not None


def test_foreground_rebuild_happens_at_the_interval(small_world, make_store):
    weights, labels, queries = small_world
    selector = build_selector(_cfg(type="hnsw", refresh="interval", interval=3, background=False),
                              make_store(weights), "fc", C)
    assert selector.index_ready and selector.upkeep()["rebuilds"] == 1
    for step in (1, 2):
        selector.maybe_refresh(step)
    assert selector.upkeep()["rebuilds"] == 1
    selector.maybe_refresh(3)
    assert selector.upkeep()["rebuilds"] == 2 and selector.upkeep()["bg_cpu_seconds"] == 0


def test_adaptive_policy_triggers_on_drift_and_not_without(small_world, make_store):
    weights, labels, queries = small_world
    store = make_store(weights)
    selector = build_selector(_cfg(type="annoy", refresh="adaptive", interval=2, drift_threshold=0.05,
                                   max_interval=0, background=False, annoy_trees=5, drift_rows=0), store, "fc", C)
    rows = np.arange(0, C, 2)
    for step in range(1, 30):  # the trainer sees rows, but they do not move
        selector.observe(rows, store.get_rows("fc", rows))
        selector.maybe_refresh(step)
    assert selector.upkeep()["rebuilds"] == 1 and selector.drift == pytest.approx(0, abs=1e-3)
    old = store.get_rows("fc", rows)
    assert selector.observe(rows, old * 3.0) is None and selector.drift == pytest.approx(0, abs=1e-3)  # cosine: length is no drift
    # half the rows turn by 0.2 rad: each moves |2 sin(0.1)| ~ 0.2 as a unit vector, drift ~0.1 over all classes
    turn = np.roll(old, 1, axis=1)
    turn -= (np.sum(turn * old, axis=1, keepdims=True) / np.sum(old * old, axis=1, keepdims=True)) * old
    turn *= np.linalg.norm(old, axis=1, keepdims=True) / np.linalg.norm(turn, axis=1, keepdims=True)
    moved = (np.cos(0.2) * old + np.sin(0.2) * turn).astype(np.float32)
    store.set_rows("fc", rows, moved)
    selector.observe(rows, moved)
    assert selector.drift == pytest.approx(len(rows) * 2 * np.sin(0.1) / C, rel=1e-3)
    selector.maybe_refresh(30)
    assert selector.upkeep()["rebuilds"] == 2 and selector.drift == 0


def _turned(rows_values: np.ndarray, angle: float) -> np.ndarray:
    """Each row turned by ``angle`` radians, its length kept."""
    turn = np.roll(rows_values, 1, axis=1)
    turn -= (np.sum(turn * rows_values, axis=1, keepdims=True) / np.sum(rows_values ** 2, axis=1, keepdims=True)) * rows_values
    turn *= np.linalg.norm(rows_values, axis=1, keepdims=True) / np.linalg.norm(turn, axis=1, keepdims=True)
    return (np.cos(angle) * rows_values + np.sin(angle) * turn).astype(np.float32)


def test_drift_rows_measures_a_subset_and_scales_to_the_rows_seen(small_world, make_store):
    weights = small_world[0]
    selector = build_selector(_cfg(type="annoy", background=False, annoy_trees=2, drift_rows=10), make_store(weights),
                              "fc", C)
    rows = np.arange(0, C, 2)
    selector.observe(rows, _turned(weights[rows], 0.2))  # every row turned alike: 10 measured stand for all 1000
    assert np.count_nonzero(~np.isnan(selector.index._tracker.change)) == 10
    assert selector.drift == pytest.approx(len(rows) * 2 * np.sin(0.1) / C, rel=1e-3)


def test_refresh_policy_rules():
    interval = RefreshPolicy("interval", interval=10)
    assert not interval.due(9, 1.0) and interval.due(10, 0.0)
    adaptive = RefreshPolicy("adaptive", interval=10, max_interval=100, drift_threshold=0.05)
    assert not adaptive.due(5, 0.9)  # never more often than every `interval` steps
    assert adaptive.due(10, 0.05) and not adaptive.due(99, 0.01) and adaptive.due(100, 0.0)
    assert not RefreshPolicy("adaptive", interval=10, max_interval=0).due(10**6, 0.0)


def test_drift_tracker_counts_each_row_once_and_accepts_updates():
    tracker = DriftTracker(4, metric="dot")
    indexed = np.ones((1, 2), dtype=np.float32)
    tracker.observe(np.array([0]), np.full((1, 2), 2.0, dtype=np.float32), indexed)
    tracker.observe(np.array([0]), np.full((1, 2), 1.5, dtype=np.float32), indexed)  # replaces, not adds
    assert tracker.drift == pytest.approx(0.5 / 4)
    tracker.accept(np.array([0]))
    assert tracker.drift == 0
    tracker.see(np.array([1, 2, 3]))  # seen, not measured: the measured mean (0) stands for them
    tracker.observe(np.array([1]), np.full((1, 2), 2.0, dtype=np.float32), indexed)
    assert tracker.drift == pytest.approx((1.0 / 2) * 4 / 4)  # mean of measured {0, 1} x 4 seen / 4 rows


def test_cosine_drift_is_the_change_of_direction_only():
    tracker = DriftTracker(2, metric="cosine")
    indexed = np.array([[3.0, 4.0], [1.0, 0.0]], dtype=np.float32)
    moved = tracker.observe(np.array([0, 1]), np.array([[6.0, 8.0], [0.0, 2.0]], dtype=np.float32), indexed)
    np.testing.assert_allclose(moved, [0.0, np.sqrt(2.0)], atol=1e-6)  # a longer row does not move its neighbours


@pytest.mark.parametrize("name", ["annoy", "hnsw", "exact"])
def test_indexed_rows_are_what_the_index_holds(name, small_world, make_store):
    weights = small_world[0]
    selector = build_selector(_cfg(type=name, background=False), make_store(weights), "fc", C)
    rows = np.array([5, 0, 1999])
    held = selector.sampler.indexed_rows(rows)
    expected = weights[rows] if name == "annoy" else normalise_rows(weights[rows])  # hnsw/exact store unit rows
    np.testing.assert_allclose(held, expected, rtol=1e-5, atol=1e-6)
    selector.observe(rows, weights[rows])
    selector.observe(np.empty(0, dtype=np.int64), np.empty((0, D), dtype=np.float32))  # nothing fetched: a no-op
    assert selector.drift == pytest.approx(0.0, abs=1e-6)  # unchanged rows: no drift, for every metric convention


@pytest.mark.parametrize("name", ["annoy", "hnsw"])
def test_background_build_leaves_no_snapshot_in_memory_or_on_disk(name, small_world, make_store, tmp_path):
    weights, labels, queries = small_world
    workdir = tmp_path / "work"
    selector = build_selector(_cfg(type=name, snapshot_rows=500, workdir=str(workdir)), make_store(weights), "fc", C)
    assert selector.wait_ready(60)
    assert _exact_recall(selector, weights, queries) > 0.5
    assert list(workdir.iterdir()) == []  # the snapshot file and the index file are gone
    selector.close()


def test_a_build_removes_folders_left_by_builds_whose_process_died(small_world, make_store, tmp_path):
    import subprocess
    import sys

    weights, _, _ = small_world
    workdir = tmp_path / "work"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    for folder, owner in (("hfs-index-dead", dead.stdout.strip()), ("hfs-index-alive", str(os.getpid())),
                          ("hfs-index-unowned", None), ("other", dead.stdout.strip())):
        (workdir / folder).mkdir(parents=True)
        (workdir / folder / "snapshot.npy").write_bytes(b"x" * 100)
        if owner is not None:
            (workdir / folder / "owner.pid").write_text(owner)
    selector = build_selector(_cfg(type="annoy", snapshot_rows=500, workdir=str(workdir)), make_store(weights), "fc", C)
    assert selector.wait_ready(60)
    selector.close()
    assert sorted(p.name for p in workdir.iterdir()) == ["hfs-index-alive", "hfs-index-unowned", "other"]


def test_exact_updates_every_observed_row_and_never_drifts(small_world, make_store):
    weights, labels, queries = small_world
    selector = build_selector(_cfg(type="exact", background=False), make_store(weights), "fc", C)
    rows = np.array([3, 1, 3])  # duplicates are fine
    selector.observe(rows, np.stack([queries[0], queries[1], queries[0]]))
    assert selector.upkeep()["rows_updated"] == 2 and selector.drift == 0
    assert selector.sampler.candidates(queries[:1], 1)[0, 0] == 3


def test_hnsw_updates_only_rows_that_moved_within_budget(small_world, make_store):
    weights, labels, queries = small_world
    selector = build_selector(_cfg(type="hnsw", background=False, update_threshold=0.1, update_budget=3),
                              make_store(weights), "fc", C)
    rows = np.arange(10)
    values = weights[rows].copy()
    values[:5] = queries[:5]  # five rows move far, five stay
    selector.observe(rows, values)
    assert selector.upkeep()["rows_updated"] == 3
    selector.observe(rows, values)
    assert selector.upkeep()["rows_updated"] == 5


def test_all_classes_active_builds_no_index(small_world, make_store):
    weights, labels, queries = small_world
    cfg = load_config(None, ["fc.sample_num=5000", "sampler.type=hnsw"])
    selector = build_selector(cfg, make_store(weights), "fc", C)
    assert not selector.uses_index and selector.upkeep()["rebuilds"] == 0 and not selector.upkeep()["building"]
    active, local = selector.select(queries, labels, 1)
    np.testing.assert_array_equal(active, np.arange(C))
    np.testing.assert_array_equal(local, labels)
    selector.maybe_refresh(10**6)
    assert selector.upkeep()["rebuilds"] == 0


def test_random_sampler_never_builds(small_world, make_store):
    weights, labels, queries = small_world
    selector = build_selector(_cfg(type="random"), make_store(weights), "fc", C)
    _valid(*selector.select(queries, labels, 1), labels)
    selector.observe(np.arange(5), weights[:5])
    selector.maybe_refresh(10**6)
    assert selector.upkeep()["rebuilds"] == 0


def test_too_many_distinct_labels_keeps_positives_and_warns_once(small_world, make_store, caplog):
    weights, _, queries = small_world
    cfg = load_config(None, ["fc.sample_num=10", "sampler.type=random"])
    selector = build_selector(cfg, make_store(weights), "fc", C)
    labels = np.arange(64)
    with caplog.at_level(logging.WARNING):
        for step in range(3):
            active, local = selector.select(queries, labels, step)
            np.testing.assert_array_equal(active, labels)
    assert sum("distinct labels" in r.message for r in caplog.records) == 1


def test_store_shape_must_match_num_classes(small_world, make_store):
    with pytest.raises(ValueError, match="num_classes"):
        build_selector(_cfg(), make_store(small_world[0]), "fc", C + 1)


def test_failed_builds_keep_the_old_index_then_give_up(small_world, make_store, monkeypatch):
    from hfs.samplers import owned as selector_mod
    from hfs.utils.errors import HfsError

    weights, labels, queries = small_world
    selector = build_selector(_cfg(type="hnsw", refresh="interval", interval=1, background=False),
                              make_store(weights), "fc", C)
    live = selector.sampler
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise MemoryError("no room")

    monkeypatch.setattr(type(live), "rebuild", broken)
    for step in range(1, selector_mod.MAX_FAILED_BUILDS):
        selector.maybe_refresh(step)
        assert selector.sampler is live and selector.upkeep()["failed_builds"] == step
        _valid(*selector.select(queries, labels, step), labels)
    with pytest.raises(HfsError, match="in a row failed; last: no room"):
        selector.maybe_refresh(selector_mod.MAX_FAILED_BUILDS)
    assert len(calls) == selector_mod.MAX_FAILED_BUILDS


def test_hard_after_gives_uniform_negatives_first_then_the_index(small_world, make_store):
    from hfs.samplers.selection import select_active_classes

    weights, labels, queries = small_world
    selector = build_selector(_cfg(type="exact", background=False, hard_after=3), make_store(weights), "fc", C)
    assert selector.index_ready  # built at once; only its use waits
    early, local = selector.select(queries, labels, 2)
    expected, _ = select_active_classes(labels, None, 200, C, selector.rule.rng_for(2))
    np.testing.assert_array_equal(early, expected)  # the random rule, the step's fill stream
    _valid(early, local, labels)
    late, local = selector.select(queries, labels, 3)
    _valid(late, local, labels)
    nearest = selector.sampler.candidates(queries, 2)
    hard = set(nearest.ravel().tolist()) - set(labels.tolist())
    assert len(hard & set(late.tolist())) > 0.9 * len(hard) > len(hard & set(early.tolist()))
    selector.close()


@pytest.mark.parametrize("sampler, reads", [("annoy", 10), ("exact", C // 2)])
def test_a_reader_is_asked_only_for_the_rows_the_index_uses(small_world, make_store, sampler, reads):
    """A store passes a function instead of the changed rows' values: a costly index reads only its
    ``drift_rows`` of them, a cheap one every row (it updates them in place); same drift as with values."""
    weights = small_world[0]
    rows = np.arange(0, C, 2)
    moved = weights.copy()
    moved[rows] = _turned(weights[rows], 0.2)
    drifts, asked = [], []

    def read(wanted):
        asked.append(len(wanted))
        return moved[wanted]

    for values in (moved[rows], read):
        selector = build_selector(_cfg(type=sampler, background=False, annoy_trees=2, drift_rows=10),
                                  make_store(weights), "fc", C)
        selector.observe(rows, values)
        drifts.append(selector.drift)
    assert asked == [reads]
    assert drifts[0] == drifts[1]
