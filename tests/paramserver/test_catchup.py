"""The catchup update rule equals torch's dense SGD on the whole matrix, at sparse cost."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hfs.paramserver.base import HParams
from hfs.paramserver.catchup import RECENT_TICKS, RowClock, StepHistory, zero_grad_transition
from hfs.paramserver.kernels import load_kernel
from hfs.paramserver.scratch import Scratch
from hfs.paramserver.sharding import ShardSpec
from hfs.paramserver.store import InProcessStore, StoreError

LR_SCHEDULE = (0.3, 0.05, 0.2, 0.01)  # a changing lr: one value per quarter of the run


def lr_at(step: int, steps: int) -> float:
    return LR_SCHEDULE[min(len(LR_SCHEDULE) - 1, 4 * step // steps)] * (1.0 + 0.5 * np.sin(step))


def test_suffix_products_match_stepping():
    rng = np.random.default_rng(0)
    history, mats = StepHistory(), []
    for _ in range(777):
        mats.append(zero_grad_transition(rng.uniform(0.0, 0.5), rng.uniform(0.0, 0.99), rng.uniform(0, 1e-3)))
        history.append(mats[-1])
    assert_suffix_products(history, mats, np.array([0, 1, 2, 3, 255, 256, 257, 511, 512, 700, 776, 777]))


def assert_suffix_products(history: StepHistory, mats: list[np.ndarray], starts: np.ndarray) -> None:
    """Each start's suffix product from ``history`` equals stepping through ``mats[start:]`` one by one."""
    for start, got in zip(starts, history.suffix_products(starts)):
        want = np.eye(2)
        for m in mats[start:]:
            want = m @ want
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)


def test_suffix_products_reject_ticks_outside_the_history():
    history = StepHistory()
    history.append(np.eye(2))
    with pytest.raises(ValueError):
        history.suffix_products(np.array([2]))


def assert_roundoff(got: np.ndarray, want: np.ndarray, rtol: float = 1e-5) -> None:
    """Equal to float32 round-off: relative to each value, or to the matrix's scale where values cancel."""
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * float(np.abs(want).max()))


def _torch_dense(w0: np.ndarray, schedule: list[tuple[np.ndarray, np.ndarray]], lrs: list[float],
                 momentum: float, wd: float) -> tuple[np.ndarray, np.ndarray]:
    w = torch.nn.Parameter(torch.from_numpy(w0.copy()))
    opt = torch.optim.SGD([w], lr=lrs[0], momentum=momentum, weight_decay=wd)
    for (rows, grads), lr in zip(schedule, lrs):
        for group in opt.param_groups:
            group["lr"] = lr
        full = torch.zeros_like(w)
        full.index_add_(0, torch.from_numpy(rows), torch.from_numpy(grads))
        w.grad = full
        opt.step()
    buf = opt.state[w].get("momentum_buffer")  # none without momentum
    return w.detach().numpy(), None if buf is None else buf.numpy()


def _store_run(rule: str, w0: np.ndarray, schedule, lrs, momentum: float, wd: float, *,
               read_every: int = 0, shards: int = 1, kernel: str = "auto", snapshot_dir=None) -> list[InProcessStore]:
    stores = [InProcessStore(snapshot_dir, update_rule=rule, shard=ShardSpec(i, shards), kernel=kernel)
              for i in range(shards)]
    num_rows, dim = w0.shape
    for store in stores:
        store.create("fc", num_rows, dim, init="zeros")
        lo, hi = store.shard.row_range(num_rows)
        store.set_rows("fc", np.arange(lo, hi), w0[lo:hi])
    for step, ((rows, grads), lr) in enumerate(zip(schedule, lrs)):
        for store in stores:
            lo, hi = store.shard.row_range(num_rows)
            mine = (rows >= lo) & (rows < hi)
            store.set_hparams("fc", HParams(lr, momentum, wd))
            if read_every and step % read_every == 0:  # reads in between must not change the result
                store.get_rows("fc", rows[mine])
            store.push_grads("fc", rows[mine], grads[mine], step)
    return stores


def _gather(stores: list[InProcessStore], name: str = "fc") -> np.ndarray:
    return np.concatenate([chunk for s in stores for _, chunk in s.iter_chunks(name)])


def _schedule(num_rows: int, dim: int, steps: int, rng: np.random.Generator, idle: dict[int, int]):
    """Random active rows per step, plus rows that are active only at the chosen step counts:
    row r of ``idle`` is active at step 0 and then again after ``idle[r]`` idle steps."""
    schedule = []
    busy = np.array([r for r in range(num_rows) if r not in idle])
    for step in range(steps):
        rows = rng.choice(busy, size=6, replace=True)  # repeats add up, as in the store
        extra = [r for r, gap in idle.items() if step == 0 or step == gap + 1]
        rows = np.concatenate([rows, np.array(extra, dtype=np.int64)]).astype(np.int64)
        schedule.append((rows, rng.standard_normal((rows.size, dim)).astype(np.float32)))
    return schedule


@pytest.mark.parametrize("momentum,wd", [(0.9, 5e-4), (0.0, 1e-3), (0.9, 0.0)])
def test_catchup_equals_torch_dense_sgd_with_a_changing_lr(momentum, wd, kernel):
    rng = np.random.default_rng(1)
    num_rows, dim, steps = 40, 8, 240
    idle = {30: 0, 31: 1, 32: 100, 33: 10_000}  # active again after 0, 1, 100 idle steps; 33 never again
    schedule = _schedule(num_rows, dim, steps, rng, idle)
    lrs = [lr_at(t, steps) for t in range(steps)]
    w0 = rng.standard_normal((num_rows, dim)).astype(np.float32)
    want_w, want_buf = _torch_dense(w0, schedule, lrs, momentum, wd)
    for read_every in (0, 7):
        stores = _store_run("catchup", w0, schedule, lrs, momentum, wd, read_every=read_every, kernel=kernel)
        assert_roundoff(_gather(stores), want_w)
        if want_buf is not None:
            stores[0]._matrices["fc"].catch_up_all()
            assert_roundoff(stores[0]._matrices["fc"].momentum, want_buf)


def test_catchup_over_ten_thousand_idle_steps(kernel):
    """A row idle for 10,000 steps with momentum, weight decay and a changing lr."""
    rng = np.random.default_rng(2)
    num_rows, dim, steps = 6, 4, 10_002
    lrs = [lr_at(t, steps) * 0.5 for t in range(steps)]
    schedule = []
    for step in range(steps):
        rows = np.array([0, 1] if step in (0, steps - 1) else [1], dtype=np.int64)
        schedule.append((rows, rng.standard_normal((rows.size, dim)).astype(np.float32)))
    w0 = rng.standard_normal((num_rows, dim)).astype(np.float32)
    want_w, _ = _torch_dense(w0, schedule, lrs, 0.9, 5e-4)
    got = _gather(_store_run("catchup", w0, schedule, lrs, 0.9, 5e-4, kernel=kernel))
    assert_roundoff(got, want_w)


def test_dense_rule_equals_torch_and_lazy_does_not(kernel):
    rng = np.random.default_rng(3)
    num_rows, dim, steps = 20, 4, 50
    schedule = _schedule(num_rows, dim, steps, rng, {15: 20})
    lrs = [lr_at(t, steps) for t in range(steps)]
    w0 = rng.standard_normal((num_rows, dim)).astype(np.float32)
    want_w, _ = _torch_dense(w0, schedule, lrs, 0.9, 5e-4)
    assert_roundoff(_gather(_store_run("dense", w0, schedule, lrs, 0.9, 5e-4, kernel=kernel)), want_w)
    lazy = _gather(_store_run("lazy", w0, schedule, lrs, 0.9, 5e-4, kernel=kernel))
    assert np.abs(lazy - want_w).max() > 1e-3


def test_catchup_is_the_same_over_shards(kernel):
    rng = np.random.default_rng(4)
    num_rows, dim, steps = 30, 4, 60
    schedule = _schedule(num_rows, dim, steps, rng, {})
    lrs = [lr_at(t, steps) for t in range(steps)]
    w0 = rng.standard_normal((num_rows, dim)).astype(np.float32)
    one = _gather(_store_run("catchup", w0, schedule, lrs, 0.9, 5e-4, kernel=kernel))
    three = _gather(_store_run("catchup", w0, schedule, lrs, 0.9, 5e-4, shards=3, kernel=kernel))
    np.testing.assert_allclose(three, one, rtol=1e-6, atol=1e-7)


def test_snapshot_holds_caught_up_rows_and_restores(tmp_path, kernel):
    rng = np.random.default_rng(5)
    num_rows, dim, steps = 25, 4, 40
    schedule = _schedule(num_rows, dim, steps, rng, {})
    lrs = [0.1] * steps
    w0 = rng.standard_normal((num_rows, dim)).astype(np.float32)
    want_w, _ = _torch_dense(w0, schedule, lrs, 0.9, 5e-4)
    store = _store_run("catchup", w0, schedule, lrs, 0.9, 5e-4, kernel=kernel, snapshot_dir=tmp_path)[0]
    store.snapshot("t")
    clock = store._matrices["fc"].clock
    assert clock.now == 0 and not clock.row_tick.any()  # the history was forgotten
    restored = InProcessStore(tmp_path, kernel=kernel)
    assert restored.restore("t") == steps
    assert restored.matrices()["fc"]["update_rule"] == "catchup"
    assert_roundoff(_gather([restored]), want_w)


def _empty_step_run(rule: str, kernel: str) -> tuple[np.ndarray, np.ndarray]:
    store = InProcessStore(update_rule=rule, kernel=kernel)
    store.create("fc", 4, 2, init="gaussian", seed=1)
    store.set_hparams("fc", HParams(0.1, 0.9, 1e-2))
    store.push_grads("fc", np.array([0]), np.ones((1, 2), np.float32), 0)
    before = store.get_rows("fc", np.arange(4))
    store.push_grads("fc", np.zeros(0, np.int64), np.zeros((0, 2), np.float32), 1)
    return before, store.get_rows("fc", np.arange(4))


def test_an_empty_step_is_a_zero_gradient_step(kernel):
    """A push with no rows (a shard owning none of the step's rows) is still a step of the matrix."""
    before, lazy = _empty_step_run("lazy", kernel)
    np.testing.assert_array_equal(lazy, before)
    _, dense = _empty_step_run("dense", kernel)
    _, catchup = _empty_step_run("catchup", kernel)
    assert not np.allclose(dense, before)
    assert_roundoff(catchup, dense)


def test_existing_matrix_switches_rule_and_bad_rule_is_refused():
    store = InProcessStore()
    store.create("fc", 4, 2, update_rule="lazy")
    assert store.matrices()["fc"]["update_rule"] == "lazy"
    store.create("fc", 4, 2, exist_ok=True, update_rule="catchup")
    assert store.matrices()["fc"]["update_rule"] == "catchup"
    with pytest.raises(StoreError, match="update_rule"):
        store.create("other", 4, 2, update_rule="sometimes")
    with pytest.raises(StoreError, match="update_rule"):
        InProcessStore(update_rule="eager")


def test_row_clock_repeated_rows_are_harmless(kernel):
    clock = RowClock(3, load_kernel(kernel))
    clock.tick(np.array([0]), zero_grad_transition(0.1, 0.9, 0.01))
    w = np.ones((3, 2), np.float32)
    b = np.full((3, 2), 0.5, np.float32)
    assert clock.catch_up(w, b, np.array([1, 1, 2])) == 3
    np.testing.assert_array_equal(w[1], w[2])
    assert clock.catch_up(w, b, np.array([1, 2])) == 0  # now current


def _clock_with_history(rows: int, ticks: int, seed: int,
                        kernel: str = "numpy") -> tuple[RowClock, np.ndarray, np.ndarray]:
    """A clock whose rows stopped at random ticks of a changing-lr history, and random state."""
    rng = np.random.default_rng(seed)
    clock = RowClock(rows, load_kernel(kernel))
    stop_at = rng.integers(0, ticks + 1, rows)
    for t in range(ticks):
        clock.tick(np.flatnonzero(stop_at > t), zero_grad_transition(0.05 * (1 + t % 3), 0.9, 5e-4))
    w = rng.standard_normal((rows, 6)).astype(np.float32)
    return clock, w, rng.standard_normal((rows, 6)).astype(np.float32)


@pytest.mark.parametrize("current", [0, 3, 8, 10, 40])
def test_read_equals_catch_up_then_gather_and_writes_nothing(current, kernel):
    """RowClock.read gives catch-up-then-gather's values bit for bit (repeated rows included) and
    leaves the matrix and the ticks as they were; a push after it catches the rows up to those values."""
    clock, w, b = _clock_with_history(40, 100, seed=current, kernel=kernel)
    clock.row_tick[:current] = clock.now  # some rows already current
    ref_clock, ref_w, ref_b = _clock_with_history(40, 100, seed=current, kernel=kernel)
    ref_clock.row_tick[:current] = ref_clock.now
    before = (w.copy(), b.copy(), clock.row_tick.copy())
    rows = np.array([0, 1, 2, 5, 5, 7, 9, 3, 8, 6], dtype=np.int64)
    got = clock.read(w, b, rows, Scratch())
    ref_clock.catch_up(ref_w, ref_b, rows)
    np.testing.assert_array_equal(got, ref_w[rows])
    for now, was in zip((w, b, clock.row_tick), before):
        np.testing.assert_array_equal(now, was)
    unique = np.unique(rows)
    zero = np.zeros((unique.size, w.shape[1]), np.float32)
    clock.step(w, b, unique, zero, HParams(0.0, 0.9, 0.0))  # lr 0: the push's catch-up alone moves w
    np.testing.assert_array_equal(w[rows], got)


def test_recent_suffix_products_match_the_block_tree():
    """Starts within RECENT_TICKS come from the running products, older ones from the tree: both
    equal stepping, across the boundary."""
    history = StepHistory()
    rng = np.random.default_rng(3)
    mats = [zero_grad_transition(float(rng.uniform(0.01, 0.3)), 0.9, 5e-4) for _ in range(RECENT_TICKS + 40)]
    for m in mats:
        history.append(m)
    n = len(mats)
    assert_suffix_products(history, mats,
                           np.array([0, 1, n - RECENT_TICKS - 1, n - RECENT_TICKS, n - 5, n - 1, n], dtype=np.int64))


def test_scratch_reuse_changes_nothing():
    """The same catch-ups with one reused Scratch and with fresh arrays are bit-identical."""
    clock_a, w_a, b_a = _clock_with_history(64, 50, seed=7)
    clock_b, w_b, b_b = _clock_with_history(64, 50, seed=7)
    scratch = Scratch()
    for rows in (np.arange(0, 30), np.arange(20, 64), np.array([63, 1, 2])):
        clock_a.catch_up(w_a, b_a, rows, scratch)
        clock_b.catch_up(w_b, b_b, rows)
    np.testing.assert_array_equal(w_a, w_b)
    np.testing.assert_array_equal(b_a, b_b)


@pytest.mark.parametrize("current", [0, 8])
def test_read_answers_once_with_its_values(current, kernel):
    """``answer`` gets the values once (the server sends its reply there), the same as a read without it."""
    clock, w, b = _clock_with_history(40, 100, seed=current, kernel=kernel)
    clock.row_tick[:current] = clock.now
    rows = np.array([0, 1, 2, 5, 7, 9, 3, 8, 6, 30], dtype=np.int64)
    want = clock.read(w, b, rows, Scratch())
    seen = []
    got = clock.read(w, b, rows, Scratch(), answer=lambda values: seen.append(values.copy()))
    assert len(seen) == 1
    np.testing.assert_array_equal(seen[0], want)
    np.testing.assert_array_equal(got, want)
