"""Pushes that do not wait for their reply (paramserver.pipeline_pushes): the same numbers as
waiting for each reply, failures reported by the call that collects them, nothing lost at close."""

from __future__ import annotations

import time

import numpy as np
import pytest

from hfs.paramserver.base import HParams
from hfs.paramserver.sharding import ShardSpec
from hfs.paramserver.store import InProcessStore
from hfs.utils.errors import HfsError

from tests.paramserver.helpers import EXACT, catchup_store, select_into, served_client  # noqa: E402

zmq = pytest.importorskip("zmq")
C, D, B = 301, 5, 6  # odd sizes: arrays after a pending push start at unaligned byte counts


def _store(shard: ShardSpec = ShardSpec()) -> InProcessStore:
    return catchup_store(C, D, shard)


def _client(address, *, pipeline: bool = True, mode: str = "auto", timeout_s: float = 10.0):
    return served_client(address, timeout_s=timeout_s, mode=mode, pipeline=pipeline)


def _state(store: InProcessStore) -> tuple:
    m = store._matrix("fc")
    return m.weight.tobytes(), m.momentum.tobytes(), m.last_applied


def _traffic(client) -> list[np.ndarray]:
    """Catchup steps with a changing lr: get / select / push, a push right after a push, a set,
    and the whole matrix at the end; every array the client got back."""
    rng = np.random.default_rng(11)
    seen = []
    client.attach_index("fc", EXACT)
    for step in range(6):
        client.set_hparams("fc", HParams(0.3 / (1 + step), 0.9, 1e-3))
        rows = rng.choice(C, int(rng.integers(7, 60)), replace=False)
        seen.append(client.get_rows("fc", rows, step=step))
        if step % 2:
            rows = select_into(client, rng, step, rows, seen, batch=B, dim=D, classes=C)
        client.push_grads("fc", rows, rng.standard_normal((rows.size, D)).astype(np.float32), step)
    client.push_grads("fc", np.array([1, 2, 1]), np.ones((3, D), np.float32), 6)  # a push after a push
    client.set_rows("fc", np.array([3, 250]), np.full((2, D), 0.25, np.float32))
    seen.append(client.get_rows("fc", np.arange(C), step=7))
    seen += [chunk for _, chunk in client.iter_chunks("fc", chunk_rows=128)]
    return seen


@pytest.mark.parametrize("mode", ["auto", "off"])
@pytest.mark.parametrize("count", [1, 2])
def test_pipelined_pushes_give_the_waiting_numbers_bit_for_bit(thread_server, count, mode):
    results, states = {}, {}
    for pipeline in (True, False):
        servers = [thread_server(_store(ShardSpec(i, count))) for i in range(count)]
        with _client([s.endpoint for s in servers], pipeline=pipeline, mode=mode) as client:
            results[pipeline] = _traffic(client)
        states[pipeline] = [_state(s.server.store) for s in servers]
        assert all(s.server.stats.errors.get("invalid", 0) == 0 for s in servers)
        if mode == "auto":
            assert all(s.server.stats.shm_bytes_in > 0 for s in servers)
    assert states[True] == states[False]
    assert len(results[True]) == len(results[False])
    for got, want in zip(results[True], results[False]):
        assert got.dtype == want.dtype and got.tobytes() == want.tobytes()


def test_push_returns_before_its_reply_and_the_next_request_collects_it(thread_server):
    srv = thread_server(_store())
    with _client(srv.endpoint) as client:
        rows = np.arange(0, C, 7)
        client.get_rows("fc", rows, step=0)
        client.push_grads("fc", rows, np.ones((rows.size, D), np.float32), 0)
        assert [c.pending is not None for c in client._wire.connections()] == [True]
        after = client.get_rows("fc", rows, step=1)  # sent behind the push: sees it applied
        assert [c.pending is not None for c in client._wire.connections()] == [False]
        assert srv.server.store.last_applied("fc") == 0
        np.testing.assert_array_equal(after, srv.server.store.get_rows("fc", rows))


@pytest.mark.parametrize("mode", ["auto", "off"])
@pytest.mark.parametrize("bad", ["shape", "step"])
@pytest.mark.parametrize("collector", ["get", "flush", "push"])
def test_a_failed_push_raises_from_the_call_that_collects_it(thread_server, bad, collector, mode):
    from hfs.paramserver.client import ServerError

    srv = thread_server(_store())
    rows = np.arange(10)
    with _client(srv.endpoint, mode=mode) as client:
        client.get_rows("fc", rows)
        client.push_grads("fc", rows, np.ones((10, D), np.float32), 0)
        client.flush()
        before = _state(srv.server.store)
        grads = np.ones((10, D + 1 if bad == "shape" else D), np.float32)
        client.push_grads("fc", rows, grads, 1 if bad == "shape" else 0)  # returns: the error comes later
        step = 1 if bad == "shape" else 0
        with pytest.raises(ServerError, match=rf"^push for step {step} failed: parameter server .*: "):
            if collector == "get":
                client.get_rows("fc", rows)
            elif collector == "flush":
                client.flush()
            else:
                client.push_grads("fc", rows, np.ones((10, D), np.float32), 1)
        assert _state(srv.server.store) == before  # the failed push changed nothing
        # the client goes on: the next step is applied as usual
        client.push_grads("fc", rows, np.ones((10, D), np.float32), 1)
        np.testing.assert_array_equal(client.get_rows("fc", rows, step=2), srv.server.store.get_rows("fc", rows))


def test_a_failed_push_on_one_shard_of_two_is_reported(shard_pair):
    from hfs.paramserver.client import ServerError

    for srv in shard_pair:
        srv.server.store.create("fc", C, D, seed=1)
        srv.server.store.set_hparams("fc", HParams(0.1))
    with _client([s.endpoint for s in shard_pair]) as client:
        rows = np.array([0, C - 1])  # one row on each shard
        client.push_grads("fc", rows, np.ones((2, D), np.float32), 0)
        client.push_grads("fc", rows, np.ones((2, D), np.float32), 0)  # step 0 again: both shards refuse
        with pytest.raises(ServerError, match="push for step 0 failed: .*already applied"):
            client.flush()
        client.push_grads("fc", rows, np.ones((2, D), np.float32), 1)
        client.flush()
    assert [s.server.store.last_applied("fc") for s in shard_pair] == [1, 1]


@pytest.mark.parametrize("mode", ["auto", "off"])
def test_close_applies_a_pending_push_and_detaches_the_segment(thread_server, mode):
    srv = thread_server(_store())
    reference = _store()
    rows = np.arange(0, C, 3)
    grads = np.full((rows.size, D), 0.01, np.float32)
    client = _client(srv.endpoint, mode=mode)
    client.get_rows("fc", rows)
    client.push_grads("fc", rows, grads, 0)
    assert len(srv.server._segments) == (1 if mode == "auto" else 0)
    client.close()
    reference.push_grads("fc", rows, grads, 0)
    assert _state(srv.server.store) == _state(reference)
    assert not srv.server._segments
    assert srv.server.stats.count["detach"] == (1 if mode == "auto" else 0)


def test_close_on_a_stopped_server_returns_within_seconds(thread_server):
    srv = thread_server(_store())
    client = _client(srv.endpoint, timeout_s=30)
    client.get_rows("fc", np.arange(10))  # a segment is attached: close() will try to detach it
    srv.stop()
    started = time.monotonic()
    client.close()
    assert time.monotonic() - started < 5.0


def test_a_pending_push_to_a_lost_server_is_reported(thread_server):
    srv = thread_server(_store())
    client = _client(srv.endpoint, timeout_s=1.0)
    try:
        client.get_rows("fc", np.arange(10))
        srv.stop()
        client.push_grads("fc", np.arange(10), np.ones((10, D), np.float32), 0)  # sent, no reply will come
        with pytest.raises(HfsError, match=r"did not answer 'push for step 0' within 1 s"):
            client.get_rows("fc", np.arange(10))
    finally:
        client.close()


def test_close_reports_a_push_a_lost_server_never_answered(thread_server):
    srv = thread_server(_store())
    client = _client(srv.endpoint, timeout_s=1.0)
    client.get_rows("fc", np.arange(10))
    srv.stop()
    client.push_grads("fc", np.arange(10), np.ones((10, D), np.float32), 0)
    started = time.monotonic()
    with pytest.raises(HfsError, match=r"did not answer 'push for step 0'"):
        client.close()
    assert time.monotonic() - started < 5.0 and client._wire.closed


def test_the_in_process_store_has_nothing_to_flush():
    store = _store()
    assert not store.pipelines_pushes
    store.push_grads("fc", np.arange(3), np.ones((3, D), np.float32), 0)
    store.flush()
    assert store.last_applied("fc") == 0


def test_shutdown_collects_a_pending_push_and_leaves_nothing_to_detach(thread_server):
    srv = thread_server(_store())
    client = _client(srv.endpoint)
    try:
        client.get_rows("fc", np.arange(10))
        client.push_grads("fc", np.arange(10), np.ones((10, D), np.float32), 0)
        client.shutdown()  # the push is answered before the shutdown (same connection)
        assert srv.server.store.last_applied("fc") == 0
        # the stopping server unmaps it: close sends no detach
        assert [c.segment for c in client._wire.connections()] == [None]
    finally:
        client.close()
    assert srv.server.stats.count.get("detach", 0) == 0
