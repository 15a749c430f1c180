"""The ZeroMQ server and client: same results as the store, sync steps, shards, auth, timeouts."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from hfs.paramserver import open_store
from hfs.paramserver.base import HParams
from hfs.paramserver.client import ParamClient, ServerError
from hfs.paramserver.launch import check_bind_allowed
from hfs.paramserver.store import InProcessStore
from hfs.config import ParamServerConfig
from hfs.utils.errors import HfsError


def _exercise(store, rows_total: int = 50, dim: int = 4) -> dict[str, np.ndarray]:
    """The same sequence of calls on any WeightStore; returns what it read."""
    store.create("fc", rows_total, dim, init="gaussian", std=0.1, seed=5)
    store.set_hparams("fc", HParams(0.1, 0.9, 1e-3))
    rng = np.random.default_rng(1)
    out = {"init": store.get_rows("fc", np.arange(rows_total))}
    store.set_rows("fc", np.array([3, 40]), np.full((2, dim), 0.5, np.float32))
    for step in range(3):
        rows = rng.integers(0, rows_total, 30)  # duplicates on purpose, rows on both shards
        store.push_grads("fc", rows, rng.standard_normal((30, dim)).astype(np.float32), step)
        out[f"step{step}"] = store.get_rows("fc", rng.permutation(rows_total), step=step + 1)
    out["chunks"] = np.concatenate([c for _, c in store.iter_chunks("fc", 7)])
    assert store.shape("fc") == (rows_total, dim)
    return out


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_client_gives_the_same_results_as_the_store(thread_server):
    srv = thread_server()
    with ParamClient(srv.endpoint, timeout_s=10) as client:
        got = _exercise(client)
        assert got["init"].flags.writeable
        stats = client.stats()
        assert stats["shards"][0]["server"]["ops"]["push"]["requests"] == 3
        assert stats["shards"][0]["server"]["bytes_in"] > 0 and "p99_ms" in stats["client"]["ops"]["get"]
    _assert_same(got, _exercise(InProcessStore()))


def test_two_shards_route_rows_and_discover_peers(shard_pair):
    with ParamClient(shard_pair[0].endpoint, timeout_s=10) as client:  # one endpoint: peers come from ping
        assert client.endpoints == [s.endpoint for s in shard_pair]
        got = _exercise(client)
        held = [s.server.store.matrices()["fc"] for s in shard_pair]
        assert [(h["row_start"], h["row_end"]) for h in held] == [(0, 25), (25, 50)]
        assert client.snapshot() == "step-000000003"  # each shard writes its part under one name
        client.push_grads("fc", np.array([0, 49]), np.ones((2, 4), np.float32), 3)
        assert client.restore("latest") == 3
        np.testing.assert_array_equal(client.get_rows("fc", np.arange(50)), got["chunks"])
        assert (shard_pair[1].server.store.snapshot_dir / "step-000000003" / "fc.weight.npy").is_file()
    _assert_same(got, _exercise(InProcessStore()))


def test_several_clients_make_one_synchronous_step(thread_server, helpers):
    srv = thread_server(InProcessStore(timeout_s=20))
    clients = [ParamClient(srv.endpoint, timeout_s=20) for _ in range(3)]
    clients[0].create("fc", 8, 2, init="zeros")
    clients[0].set_hparams("fc", HParams(1.0, 0.0, 0.0))
    for i, c in enumerate(clients):
        c.register(f"w{i}")
    seen: dict[int, np.ndarray] = {}
    # The first two push and wait in get(step=1); the server keeps serving while they wait.
    waiters = []
    for i in range(2):
        def work(i=i):
            clients[i].push_grads("fc", np.array([i, 7]), np.ones((2, 2), np.float32), 0)
            seen[i] = clients[i].get_rows("fc", np.arange(8), step=1)
        waiters.append(threading.Thread(target=work))
        waiters[-1].start()
    helpers.wait_for(lambda: srv.server.store.stats()["pushes"] == 2, what="two pushes")
    assert clients[2].get_rows("fc", np.array([7]))[0, 0] == 0.0  # not applied yet, and not blocked
    clients[2].push_grads("fc", np.array([2, 7]), np.ones((2, 2), np.float32), 0)
    seen[2] = clients[2].get_rows("fc", np.arange(8), step=1)
    for t in waiters:
        t.join(20)
    expected = np.zeros((8, 2), np.float32)
    expected[[0, 1, 2]] = -1.0
    expected[7] = -3.0
    for i in range(3):
        np.testing.assert_array_equal(seen[i], expected)
    for c in clients:
        c.close()


def test_missing_worker_ends_the_step_with_an_error(thread_server):
    srv = thread_server(InProcessStore(timeout_s=0.5))
    with ParamClient(srv.endpoint, timeout_s=10) as a:
        a.create("fc", 4, 2, init="zeros")
        a.set_hparams("fc", HParams(1.0))
        a.register("a")
        a._all({"op": "register", "worker": "ghost"})
        a.push_grads("fc", np.array([0]), np.ones((1, 2), np.float32), 0)
        with pytest.raises(ServerError, match="worker\\(s\\) ghost did not push"):
            a.get_rows("fc", np.array([0]), step=1)
        np.testing.assert_array_equal(a.get_rows("fc", np.arange(4)), 0.0)


def test_secret_signs_every_message(thread_server):
    srv = thread_server(secret=b"s3cret")
    with ParamClient(srv.endpoint, timeout_s=5, secret=b"s3cret") as good:
        good.create("fc", 4, 2)
    with pytest.raises(HfsError, match="needs the shared secret"):
        ParamClient(srv.endpoint, timeout_s=2, connect_timeout_s=2)
    with pytest.raises(HfsError, match="bad HMAC"):
        ParamClient(srv.endpoint, timeout_s=2, connect_timeout_s=2, secret=b"wrong")


def test_non_loopback_bind_needs_auth():
    with pytest.raises(HfsError, match="refusing to listen on 0.0.0.0 without authentication"):
        check_bind_allowed("0.0.0.0", None, insecure=False)
    with pytest.raises(HfsError, match="without authentication"):
        check_bind_allowed("10.1.2.3", b"", insecure=False)
    check_bind_allowed("0.0.0.0", b"key", insecure=False)
    check_bind_allowed("0.0.0.0", None, insecure=True)
    check_bind_allowed("127.0.0.1", None, insecure=False)
    check_bind_allowed("::1", None, insecure=False)


def test_cli_refuses_public_bind_before_binding(tmp_path):
    from typer.testing import CliRunner

    from hfs.cli import app

    result = CliRunner().invoke(app, ["serve-params", "--host", "0.0.0.0", "--snapshot-dir", str(tmp_path)],
                                env={"HFS_PS_SECRET": ""})
    assert isinstance(result.exception, HfsError)
    assert "refusing to listen on 0.0.0.0" in str(result.exception)


def test_client_timeout_names_the_missing_server(helpers):
    port = helpers.free_port()
    with pytest.raises(HfsError) as err:
        ParamClient(f"tcp://127.0.0.1:{port}", connect_timeout_s=0.3)
    assert str(err.value) == f"no parameter server at tcp://127.0.0.1:{port} — start one with `hfs serve-params`"


def test_bad_address_and_open_store(tmp_path):
    with pytest.raises(HfsError, match="not of the form tcp://host:port"):
        ParamClient("localhost:5570")
    store = open_store(ParamServerConfig(), tmp_path / "store")
    assert isinstance(store, InProcessStore) and store.snapshot_dir == tmp_path / "store"


def test_create_carries_the_update_rule(thread_server):
    srv = thread_server()
    with ParamClient(srv.endpoint, timeout_s=10) as client:
        client.create("fc", 10, 4, update_rule="lazy")
        assert srv.server.store.matrices()["fc"]["update_rule"] == "lazy"
        client.create("fc", 10, 4, exist_ok=True)  # no rule given: the matrix keeps its own
        assert srv.server.store.matrices()["fc"]["update_rule"] == "lazy"
        with pytest.raises(HfsError, match="update_rule"):
            client.create("other", 10, 4, update_rule="eventually")
        assert "other" not in srv.server.store.matrices()


def test_a_get_is_answered_from_inside_the_read_and_a_late_failure_sends_no_second_reply(thread_server, caplog):
    """The server sends a get's reply from inside the store's read (as soon as the values are
    known); if the store fails after that, the error is logged and the client sees one reply only."""
    store = InProcessStore(timeout_s=10)
    srv = thread_server(store)
    read = store.try_get_rows

    def answer_then_fail(*args, **kw):
        read(*args, **kw)
        raise RuntimeError("the store broke after answering")

    with ParamClient(srv.endpoint, timeout_s=10) as client:
        client.create("fc", 20, 4, init="gaussian", std=0.1, seed=2)
        client.set_hparams("fc", HParams(0.1, 0.9, 0.0))
        client.push_grads("fc", np.arange(5), np.ones((5, 4), np.float32), 0)
        want = client.get_rows("fc", np.arange(20), step=1)
        store.try_get_rows = answer_then_fail
        with caplog.at_level("ERROR", logger="hfs.paramserver.server"):
            got = client.get_rows("fc", np.arange(20), step=1)
        store.try_get_rows = read
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(client.get_rows("fc", np.arange(3)), want[:3])  # the next reply is its own
        assert client.ping()[0]["shard"] == 0
    assert "get failed after its reply went out" in caplog.text
