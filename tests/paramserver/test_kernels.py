"""The row kernels: numba's fused pass gives numpy's rows; the numpy fallback when numba is missing."""

from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hfs.paramserver import kernels
from hfs.paramserver.base import HParams
from hfs.paramserver.catchup import RowClock, zero_grad_transition
from hfs.paramserver.store import InProcessStore
from hfs.utils.errors import HfsError

needs_numba = pytest.mark.skipif(importlib.util.find_spec("numba") is None, reason="numba not installed")
REPO = Path(__file__).resolve().parents[2]

#: rows active again after this many idle steps (row 33 once more at the very end only)
IDLE = {30: 0, 31: 1, 32: 100, 33: 10_000}


def _lr(step: int) -> float:
    return (0.2, 0.05, 0.1)[step * 3 // (max(IDLE.values()) + 2)] * (1.0 + 0.5 * np.sin(step))


def _active(step: int, rng: np.random.Generator) -> np.ndarray:
    """Random busy rows (0..29) and each idle row on its own schedule; sorted, no repeats."""
    busy = rng.choice(30, size=6, replace=False)
    idle = [r for r, gap in IDLE.items() if step % (gap + 1) == 0]
    return np.sort(np.concatenate([busy, np.array(idle, dtype=np.int64)]))


def _equal_to_roundoff(a: np.ndarray, b: np.ndarray) -> None:
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6 * float(np.abs(b).max()))


@needs_numba
@pytest.mark.parametrize("rule", ["catchup", "lazy"])
def test_compiled_and_numpy_kernels_give_the_same_rows(rule):
    """get + push of the same traffic through a numba and a numpy store, with a changing lr and rows
    idle 0, 1, 100 and 10,000 steps: every read and the final weights and momentum agree to
    float32 round-off (in fact bit for bit: the same float32 operations in the same order)."""
    steps = max(IDLE.values()) + 2
    stores = {name: InProcessStore(update_rule=rule, kernel=name) for name in ("numba", "numpy")}
    for store in stores.values():
        store.create("fc", 40, 8, init="gaussian", std=0.5, seed=3)
    assert stores["numba"].stats()["kernel"] == "numba" and stores["numpy"].stats()["kernel"] == "numpy"
    rng = np.random.default_rng(0)
    for step in range(steps):
        rows = _active(step, rng)
        grads = rng.standard_normal((rows.size, 8)).astype(np.float32)
        read = {}
        for name, store in stores.items():
            store.set_hparams("fc", HParams(_lr(step), 0.9, 5e-4))
            read[name] = store.get_rows("fc", rows, step=step)
            store.push_grads("fc", rows, grads, step)
        _equal_to_roundoff(read["numba"], read["numpy"])
    final = {}
    for name, store in stores.items():
        m = store._matrices["fc"]
        m.catch_up_all()
        final[name] = (m.weight.copy(), m.momentum.copy())
    _equal_to_roundoff(final["numba"][0], final["numpy"][0])
    _equal_to_roundoff(final["numba"][1], final["numpy"][1])


def _deep_clock(kernel: str, rows: int = 300, ticks: int = 700, seed: int = 0):
    """A clock whose rows stopped at random ticks (some deep in the block tree), random state."""
    rng = np.random.default_rng(seed)
    clock = RowClock(rows, kernels.load_kernel(kernel))
    stop_at = rng.integers(0, ticks + 1, rows)
    for t in range(ticks):
        clock.tick(np.flatnonzero(stop_at > t), zero_grad_transition(0.05 * (1 + t % 5), 0.9, 5e-4))
    w = rng.standard_normal((rows, 16)).astype(np.float32)
    return clock, w, rng.standard_normal((rows, 16)).astype(np.float32)


@needs_numba
def test_parallel_kernels_equal_the_serial_ones(monkeypatch):
    """Reads with repeated rows, range catch-ups and pushes on numba's threads give the serial kernels' bits."""
    results = {}
    for parallel in (False, True):
        kernel = kernels.load_kernel("numba")
        monkeypatch.setattr(kernels, "PARALLEL_MIN_ELEMENTS", 0 if parallel else 1 << 62)
        monkeypatch.setattr(kernel, "threads", 2)
        clock, w, b = _deep_clock("numba")
        rows = np.array([5, 7, 5, 299, 0, 7, 120, 5], dtype=np.int64)
        got = [clock.read(w, b, rows)]
        behind = int(np.count_nonzero(clock.row_tick[100:250] < clock.now))
        assert behind and clock.catch_up_range(w, b, 100, 250) == behind
        assert clock.catch_up_range(w, b, 100, 250) == 0
        unique = np.array([1, 2, 3, 150, 298], dtype=np.int64)
        grads = np.linspace(-1, 1, unique.size * 16, dtype=np.float32).reshape(-1, 16)
        clock.step(w, b, unique, grads, HParams(0.1, 0.9, 5e-4))
        got.append(clock.read(w, b, np.arange(300)))
        results[parallel] = (got, w, b, clock.row_tick.copy())
    for serial, parallel in zip(results[False][0] + list(results[False][1:]), results[True][0] + list(results[True][1:])):
        np.testing.assert_array_equal(parallel, serial)


@needs_numba
def test_numba_kernel_refuses_rows_out_of_range():
    clock, w, b = _deep_clock("numba", rows=10, ticks=5)
    with pytest.raises(IndexError, match="out of range"):
        clock.read(w, b, np.array([3, 10]))
    with pytest.raises(IndexError, match="out of range"):
        clock.step(w, b, np.array([-1]), np.zeros((1, 16), np.float32), HParams(0.1, 0.9, 0.0))


@pytest.fixture
def fresh_kernel_choice():
    """Forget the process's kernel choice before and after (it is made once per process)."""
    kernels._numba_kernels.cache_clear()
    kernels._log_fallback.cache_clear()
    yield
    kernels._numba_kernels.cache_clear()
    kernels._log_fallback.cache_clear()


def test_numpy_fallback_when_numba_is_missing(monkeypatch, caplog, fresh_kernel_choice):
    monkeypatch.setitem(sys.modules, "numba", None)  # `import numba` raises ImportError
    with caplog.at_level(logging.INFO, logger="hfs.paramserver.kernels"):
        assert kernels.load_kernel("auto").name == "numpy"
        store = InProcessStore()  # auto
        store.create("fc", 10, 4)
        store.set_hparams("fc", HParams(0.1, 0.9, 5e-4))
        store.push_grads("fc", np.array([1, 2]), np.ones((2, 4), np.float32), 0)
        assert store.get_rows("fc", np.arange(10)).shape == (10, 4)
    assert store.stats()["kernel"] == "numpy"
    lines = [r.getMessage() for r in caplog.records if "numpy fallback" in r.getMessage()]
    assert len(lines) == 1 and "numba is not available" in lines[0] and "pip install numba" in lines[0]
    with pytest.raises(HfsError, match="paramserver.kernel is 'numba' but numba is not available"):
        kernels.load_kernel("numba")
    with pytest.raises(HfsError, match="paramserver.kernel must be one of auto, numba, numpy"):
        InProcessStore(kernel="fast")


@needs_numba
def test_kernels_compile_uncached_where_numba_cannot_cache(monkeypatch, caplog, fresh_kernel_choice):
    """No writable cache folder (numba raises when asked to cache): one warning, the kernels still work."""
    from hfs.paramserver import kernels_numba

    real = kernels_numba.compile_kernels

    def no_cache_location(cache: bool):
        if cache:
            raise RuntimeError("cannot cache function 'sgd_rows_serial': no locator available for file")
        return real(cache=False)

    monkeypatch.setattr(kernels_numba, "compile_kernels", no_cache_location)
    with caplog.at_level(logging.WARNING, logger="hfs.paramserver.kernels"):
        kernel = kernels.load_kernel("numba")
    assert kernel.name == "numba"
    assert any("NUMBA_CACHE_DIR" in r.getMessage() for r in caplog.records)
    clock, w, b = _deep_clock("numba", rows=8, ticks=3)
    ref_clock, ref_w, ref_b = _deep_clock("numpy", rows=8, ticks=3)
    np.testing.assert_array_equal(clock.read(w, b, np.arange(8)), ref_clock.read(ref_w, ref_b, np.arange(8)))


@needs_numba
@pytest.mark.slow
def test_numba_cache_dir_holds_the_compiled_kernels(tmp_path):
    """NUMBA_CACHE_DIR (e.g. for a read-only install) is where the compiled kernels are kept."""
    code = ("import numpy as np; from hfs.paramserver.catchup import RowClock, zero_grad_transition;"
            "from hfs.paramserver.kernels import load_kernel;"
            "c = RowClock(4, load_kernel('numba')); c.tick(np.array([0]), zero_grad_transition(0.1, 0.9, 0.0));"
            "print(c.read(np.ones((4, 2), np.float32), np.zeros((4, 2), np.float32), np.arange(4))[1, 0])")
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path))
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert float(proc.stdout) == pytest.approx(1.0)  # lr 0.1, no decay, zero momentum: the row stays
    assert list(tmp_path.rglob("kernels_numba.read_rows_serial-*.nbi"))
