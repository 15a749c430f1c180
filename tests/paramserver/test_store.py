"""The in-process store: SGD equivalence with torch, sync steps, init, snapshots."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from hfs.paramserver.base import HParams
from hfs.paramserver.snapshots import SnapshotError, check_plain_name
from hfs.paramserver.matrix import sum_duplicate_rows
from hfs.paramserver.sharding import ShardSpec
from hfs.paramserver.store import InProcessStore, StoreError


def _store(tmp_path=None, **kw) -> InProcessStore:
    return InProcessStore(tmp_path, **kw)


def test_matches_torch_sgd_when_every_row_is_touched():
    torch = pytest.importorskip("torch")
    rows, dim, lr, mom, wd = 37, 8, 0.05, 0.9, 5e-4
    store = _store()
    store.create("fc", rows, dim, init="gaussian", std=0.1, seed=3)
    w0 = store.get_rows("fc", np.arange(rows))
    param = torch.nn.Parameter(torch.from_numpy(w0.copy()))
    opt = torch.optim.SGD([param], lr=lr, momentum=mom, weight_decay=wd)
    store.set_hparams("fc", HParams(lr, mom, wd))
    rng = np.random.default_rng(0)
    for step in range(6):
        grad = rng.standard_normal((rows, dim)).astype(np.float32)
        perm = rng.permutation(rows)  # order of rows in a push must not matter
        store.push_grads("fc", perm, grad[perm], step)
        param.grad = torch.from_numpy(grad)
        opt.step()
        np.testing.assert_allclose(store.get_rows("fc", np.arange(rows), step=step + 1),
                                   param.detach().numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rule,row1", [("lazy", -1.0), ("catchup", -1.5), ("dense", -1.5)])
def test_untouched_rows_under_each_update_rule(rule, row1):
    store = _store(update_rule=rule)
    store.create("fc", 4, 2, init="zeros")
    store.set_hparams("fc", HParams(1.0, 0.5, 0.0))
    store.push_grads("fc", np.array([0, 1]), np.ones((2, 2), np.float32), 0)
    store.push_grads("fc", np.array([0]), np.ones((1, 2), np.float32), 1)
    w = store.get_rows("fc", np.arange(4))
    np.testing.assert_allclose(w[0], [-2.5, -2.5])  # buf 1 then 1.5
    # not touched at step 1: lazy keeps it (no momentum step); catchup and dense coast on buf 0.5
    np.testing.assert_allclose(w[1], [row1, row1])
    np.testing.assert_allclose(w[2:], 0.0)


def test_duplicate_rows_add_up():
    rows = np.array([3, 1, 3, 0, 1, 3])
    grads = np.arange(12, dtype=np.float32).reshape(6, 2)
    uniq, summed = sum_duplicate_rows(rows, grads)
    got = dict(zip(uniq.tolist(), summed.tolist()))
    assert got == {0: [6.0, 7.0], 1: [2.0 + 8.0, 3.0 + 9.0], 3: [0.0 + 4.0 + 10.0, 1.0 + 5.0 + 11.0]}
    store = _store()
    store.create("fc", 4, 2, init="zeros")
    store.set_hparams("fc", HParams(1.0, 0.0, 0.0))
    store.push_grads("fc", rows, grads, 0)
    np.testing.assert_allclose(store.get_rows("fc", np.array([3])), [[-14.0, -17.0]])


def test_init_is_seeded_and_independent_of_sharding():
    whole = _store()
    whole.create("fc", 40000, 3, init="uniform", std=0.5, seed=7)
    full = np.concatenate([c for _, c in whole.iter_chunks("fc", 9999)])
    assert full.shape == (40000, 3) and np.abs(full).max() <= 0.5 and full.std() > 0.2
    parts = []
    for i in range(3):
        shard = _store(shard=ShardSpec(i, 3))
        shard.create("fc", 40000, 3, init="uniform", std=0.5, seed=7)
        parts.extend(c for _, c in shard.iter_chunks("fc"))
    np.testing.assert_array_equal(np.concatenate(parts), full)
    other = _store()
    other.create("fc", 40000, 3, init="uniform", std=0.5, seed=8)
    assert not np.array_equal(other.get_rows("fc", np.arange(10)), full[:10])


@pytest.mark.parametrize("bad, match", [
    (lambda s: s.get_rows("nope", np.array([0])), "no matrix named 'nope'"),
    (lambda s: s.get_rows("fc", np.array([10])), "row 10 out of range"),
    (lambda s: s.get_rows("fc", np.array([-1])), "row -1 out of range"),
    (lambda s: s.set_rows("fc", np.array([0]), np.zeros((1, 3), np.float64)), "must be float32"),
    (lambda s: s.set_rows("fc", np.array([0]), np.zeros((2, 3), np.float32)), r"shape \(1, 3\)"),
    (lambda s: s.push_grads("fc", np.array([0]), np.full((1, 3), np.nan, np.float32), 0), "NaN"),
    (lambda s: s.create("fc", 5, 3), "already exists"),
    (lambda s: s.create("../x", 5, 3), "plain name"),
])
def test_bad_requests_are_refused_without_change(bad, match):
    store = _store()
    store.create("fc", 10, 3, seed=1)
    store.set_hparams("fc", HParams(0.1))
    before = store.get_rows("fc", np.arange(10))
    with pytest.raises((StoreError, SnapshotError), match=match):
        bad(store)
    np.testing.assert_array_equal(store.get_rows("fc", np.arange(10)), before)


def test_push_needs_hparams_and_increasing_steps():
    store = _store()
    store.create("fc", 4, 2)
    with pytest.raises(StoreError, match="set_hparams"):
        store.push_grads("fc", np.array([0]), np.ones((1, 2), np.float32), 0)
    store.set_hparams("fc", HParams(0.1))
    store.push_grads("fc", np.array([0]), np.ones((1, 2), np.float32), 0)
    with pytest.raises(StoreError, match="already applied"):
        store.push_grads("fc", np.array([0]), np.ones((1, 2), np.float32), 0)


def test_three_threads_make_one_synchronous_step():
    store = _store(timeout_s=20)
    store.create("fc", 6, 2, init="zeros")
    store.set_hparams("fc", HParams(1.0, 0.0, 0.0))
    workers = ["a", "b", "c"]
    for w in workers:
        store.register(w)
    results: dict[str, np.ndarray] = {}
    barrier = threading.Barrier(3)

    def work(i: int, name: str) -> None:
        barrier.wait()
        store.push_grads("fc", np.array([i, 5]), np.ones((2, 2), np.float32), 0, worker=name)
        results[name] = store.get_rows("fc", np.arange(6), step=1)

    threads = [threading.Thread(target=work, args=(i, w)) for i, w in enumerate(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    expected = np.zeros((6, 2), np.float32)
    expected[[0, 1, 2]] = -1.0
    expected[5] = -3.0
    for w in workers:
        np.testing.assert_array_equal(results[w], expected)
    assert store.stats()["steps_applied"] == 1


def _step_waiting_for(late: str, *, timeout_s: float, num_rows: int, row: int) -> InProcessStore:
    """A store (zeros num_rows x 2, lr 1) whose step 0 has worker "a"'s push of ``row`` and waits for ``late``."""
    store = _store(timeout_s=timeout_s)
    store.create("fc", num_rows, 2, init="zeros")
    store.set_hparams("fc", HParams(1.0))
    store.register("a")
    store.register(late)
    store.push_grads("fc", np.array([row]), np.ones((1, 2), np.float32), 0, worker="a")
    return store


def test_missing_worker_fails_the_step_with_its_name():
    store = _step_waiting_for("slow", timeout_s=0.3, num_rows=4, row=0)
    assert store.try_get_rows("fc", np.array([0]), step=1) is None
    with pytest.raises(StoreError, match="worker\\(s\\) slow did not push"):
        store.get_rows("fc", np.array([0]), step=1)
    np.testing.assert_array_equal(store.get_rows("fc", np.arange(4)), 0.0)  # gradients discarded
    with pytest.raises(StoreError, match="failed"):
        store.push_grads("fc", np.array([0]), np.ones((1, 2), np.float32), 0, worker="a")
    assert store.workers() == ["a"]
    store.push_grads("fc", np.array([0]), np.ones((1, 2), np.float32), 1, worker="a")
    np.testing.assert_allclose(store.get_rows("fc", np.array([0]), step=2), [[-1.0, -1.0]])


def test_leave_completes_a_waiting_step():
    store = _step_waiting_for("b", timeout_s=30, num_rows=2, row=1)
    store.leave("b")
    np.testing.assert_array_equal(store.get_rows("fc", np.array([1]), step=1), [[-1.0, -1.0]])


def test_snapshot_restore_keep_and_names(tmp_path):
    store = _store(tmp_path, keep_snapshots=2)
    store.create("fc", 5, 3, seed=2)
    store.set_hparams("fc", HParams(0.5, 0.9, 1e-4))
    names = []
    for step in range(3):
        store.push_grads("fc", np.array([step]), np.ones((1, 3), np.float32), step)
        names.append(store.snapshot())
    assert names == ["step-000000001", "step-000000002", "step-000000003"]
    assert sorted(p.name for p in tmp_path.iterdir()) == names[1:]  # keeps the last 2
    named = store.snapshot("best")
    saved = store.get_rows("fc", np.arange(5))
    store.push_grads("fc", np.array([4]), np.ones((1, 3), np.float32), 3)
    assert store.restore("latest") == 3
    np.testing.assert_array_equal(store.get_rows("fc", np.arange(5)), saved)
    assert store.restore(named) == 3
    mapped = np.load(tmp_path / "best" / "fc.weight.npy", mmap_mode="r")
    np.testing.assert_array_equal(mapped, saved)
    # Momentum and hparams came back too: the next step matches the one we undid.
    store.push_grads("fc", np.array([4]), np.ones((1, 3), np.float32), 3)
    assert store.matrices()["fc"]["hparams"] == {"lr": 0.5, "momentum": 0.9, "weight_decay": 1e-4}


@pytest.mark.parametrize("name", ["../evil", "/etc/passwd", "a/b", "..", ".hidden", "a\\b", "x" * 200])
def test_snapshot_path_escape_refused(tmp_path, name):
    store = _store(tmp_path / "snaps")
    store.create("fc", 2, 2)
    with pytest.raises(SnapshotError, match="plain name"):
        store.snapshot(name)
    with pytest.raises(SnapshotError, match="plain name"):
        store.restore(name)
    assert not (tmp_path / "evil").exists()
    with pytest.raises(SnapshotError, match="plain name"):
        store.restore("")
    assert check_plain_name("step-000000001.b_2") == "step-000000001.b_2"


def test_corrupt_snapshot_is_detected(tmp_path):
    store = _store(tmp_path)
    store.create("fc", 5, 3, seed=2)
    name = store.snapshot("s")
    path = tmp_path / name / "fc.weight.npy"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(SnapshotError, match="CRC-32"):
        store.restore("s")


def _snapshotting_store(tmp_path, **every) -> InProcessStore:
    """A store of a 3 x 2 matrix with a learning rate, taking periodic snapshots (``every``:
    ``snapshot_every_steps`` or ``snapshot_every_s``)."""
    store = _store(tmp_path, keep_snapshots=10, **every)
    store.create("fc", 3, 2)
    store.set_hparams("fc", HParams(0.1))
    return store


def _push_step(store: InProcessStore, step: int) -> None:
    store.push_grads("fc", np.array([0]), np.ones((1, 2), np.float32), step)


def test_periodic_snapshots_every_n_steps(tmp_path):
    store = _snapshotting_store(tmp_path, snapshot_every_steps=2)
    for step in range(5):
        _push_step(store, step)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000000002", "step-000000004"]


def test_a_failed_periodic_snapshot_neither_fails_the_push_nor_raises(tmp_path, monkeypatch, caplog):
    import hfs.paramserver.snapshots as snapshots

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    store = _snapshotting_store(tmp_path, snapshot_every_steps=1)
    monkeypatch.setattr(snapshots, "_write_snapshot_files", disk_full)
    _push_step(store, 0)  # applied, no exception
    np.testing.assert_allclose(store.get_rows("fc", np.array([0]), step=1), store.get_rows("fc", np.array([0])))
    assert "periodic snapshot failed" in caplog.text and "No space left on device" in caplog.text
    with pytest.raises(SnapshotError, match="cannot write snapshot .*No space left on device"):
        store.snapshot("explicit")


def test_periodic_snapshots_every_n_seconds(tmp_path):
    store = _snapshotting_store(tmp_path, snapshot_every_s=0.05)
    _push_step(store, 0)
    assert not list(tmp_path.iterdir())  # not due yet
    time.sleep(0.1)
    store.tick()  # what the server loop calls between messages
    assert [p.name for p in tmp_path.iterdir()] == ["step-000000001"]
    time.sleep(0.1)
    store.tick()  # nothing changed since: no new snapshot
    assert len(list(tmp_path.iterdir())) == 1


def test_malformed_manifest_and_wrong_shard_are_refused(tmp_path):
    store = _store(tmp_path)
    store.create("fc", 5, 3)
    store.snapshot("s")
    with pytest.raises(StoreError, match="belongs to shard 0 of 1"):
        _store(tmp_path, shard=ShardSpec(1, 2)).restore("s")
    manifest = tmp_path / "s" / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"matrices"', '"matrixes"'))
    with pytest.raises(SnapshotError, match="malformed"):
        store.restore("s")
    assert store.shape("fc") == (5, 3)  # nothing replaced


@pytest.mark.parametrize("repeats", [2, 5, 40])
def test_duplicate_sum_matches_a_dense_reference(repeats):
    rng = np.random.default_rng(repeats)
    rows = np.concatenate([rng.integers(0, 30, 200), np.full(repeats, 7)])
    grads = rng.standard_normal((rows.size, 3)).astype(np.float32)
    uniq, summed = sum_duplicate_rows(rows, grads)
    dense = np.zeros((30, 3), np.float64)
    np.add.at(dense, rows, grads.astype(np.float64))
    assert np.array_equal(uniq, np.unique(rows))
    np.testing.assert_allclose(summed, dense[uniq], rtol=1e-5, atol=1e-5)


def test_a_get_answered_early_owns_its_rows(kernel):
    """Once ``answer`` has run, the caller may overwrite the rows it passed (a same-host client
    writes its next request over that buffer): the values and the matrix stay those of the rows read."""
    store, ref = InProcessStore(kernel=kernel), InProcessStore(kernel=kernel)
    for s in (store, ref):
        s.create("fc", 50, 8, init="gaussian", std=0.1, seed=1, update_rule="catchup")
        s.set_hparams("fc", HParams(0.1, 0.9, 1e-3))
        for step in range(3):
            s.push_grads("fc", np.arange(step, 50, 7), np.ones((len(range(step, 50, 7)), 8), np.float32), step)
    rows = np.arange(10, 40, dtype=np.int64)
    got = store.try_get_rows("fc", rows, 3, answer=lambda values: rows.fill(0))
    want = ref.try_get_rows("fc", np.arange(10, 40), 3)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(store.get_rows("fc", np.arange(50)), ref.get_rows("fc", np.arange(50)))
