"""The same-host shared-memory data path: same numbers as frames, safe handshake, nothing left behind."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from hfs.paramserver import protocol as proto
from hfs.paramserver import shm
from hfs.paramserver.base import HParams
from hfs.paramserver.sharding import ShardSpec
from hfs.paramserver.store import InProcessStore

from tests.paramserver.helpers import EXACT, catchup_store, select_into, served_client  # noqa: E402

zmq = pytest.importorskip("zmq")
C, D, B = 300, 8, 6
REPO = Path(__file__).resolve().parents[2]


def _store(shard: ShardSpec = ShardSpec()) -> InProcessStore:
    return catchup_store(C, D, shard)


def _client(address, mode: str = "auto", pipeline: bool = True):
    return served_client(address, timeout_s=10, mode=mode, pipeline=pipeline)


def _traffic(client, *, with_select: bool) -> list[np.ndarray]:
    """A few catchup steps of get / push / set / select; every array the client got back."""
    rng = np.random.default_rng(7)
    seen = []
    if with_select:
        client.attach_index("fc", EXACT)
    for step in range(4):
        rows = rng.choice(C, 40, replace=False)
        seen.append(client.get_rows("fc", rows, step=step))
        if with_select:
            rows = select_into(client, rng, step, rows, seen, batch=B, dim=D, classes=C)
        client.push_grads("fc", rows, rng.standard_normal((rows.size, D)).astype(np.float32), step)
    client.set_rows("fc", np.array([3, 250]), np.full((2, D), 0.25, np.float32))
    seen.append(client.get_rows("fc", np.arange(C)))
    seen += [chunk for _, chunk in client.iter_chunks("fc", chunk_rows=128)]
    return seen


def _servers(thread_server, count: int) -> list:
    return [thread_server(_store(ShardSpec(i, count))) for i in range(count)]


@pytest.mark.parametrize("count", [1, 2])
def test_shared_memory_gives_the_frames_numbers_bit_for_bit(thread_server, count):
    results, moved = {}, {}
    for mode in ("auto", "off"):
        servers = _servers(thread_server, count)
        with _client([s.endpoint for s in servers], mode) as client:
            results[mode] = _traffic(client, with_select=True)
        moved[mode] = sum(s.server.stats.shm_bytes_in + s.server.stats.shm_bytes_out for s in servers)
    assert moved["auto"] > 0 and moved["off"] == 0
    assert len(results["auto"]) == len(results["off"])
    for got, want in zip(results["auto"], results["off"]):
        assert got.dtype == want.dtype and got.tobytes() == want.tobytes()


def test_reply_arrays_belong_to_the_caller(thread_server):
    srv = thread_server(_store())
    with _client(srv.endpoint) as client:
        first = client.get_rows("fc", np.arange(10))
        kept = first.copy()
        first += 1.0  # writable, and not the segment: the next reply must not change it
        client.get_rows("fc", np.arange(10, 20))
        np.testing.assert_array_equal(first, kept + 1.0)
        second = client.get_rows("fc", np.arange(10))
        np.testing.assert_array_equal(second, kept)


def test_big_requests_and_replies_grow_the_segment(thread_server):
    store = InProcessStore(None, timeout_s=10)
    rows = (shm.DEFAULT_REGION_BYTES // (64 * 4)) + 100  # a reply and a push larger than the first regions
    store.create("big", rows, 64, seed=2)
    store.set_hparams("big", HParams(0.1))
    srv = thread_server(store)
    with _client(srv.endpoint) as client, _client(srv.endpoint, "off") as frames:
        every = np.arange(rows)
        for step in range(2):
            np.testing.assert_array_equal(client.get_rows("big", every), frames.get_rows("big", every))
            client.push_grads("big", every, np.full((rows, 64), 1e-3, np.float32), step)
        assert client.get_rows("big", every).tobytes() == frames.get_rows("big", every).tobytes()
        attaches = srv.server.stats.count["shm"]
    assert srv.server.stats.shm_bytes_in > rows * 64 * 4 and attaches >= 2


def test_each_thread_gets_its_own_segment(thread_server):
    srv = thread_server(_store())
    with _client(srv.endpoint) as client:
        want = client.get_rows("fc", np.arange(C))
        got, errors = {}, []

        def read(i):
            try:
                for _ in range(20):
                    got[i] = client.get_rows("fc", np.arange(C))
            except Exception as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=read, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert not errors
        assert all(g.tobytes() == want.tobytes() for g in got.values())
        assert srv.server._op_stats(None, None)[0]["stats"]["shm_segments"] == 4


@pytest.mark.parametrize("refusal", ["off", "other folder"])
def test_a_refused_segment_falls_back_to_frames(thread_server, tmp_path, caplog, refusal):
    kw = {"shared_memory": False} if refusal == "off" else {"segment_folder": str(tmp_path.resolve())}
    srv = thread_server(_store(), **kw)
    reference = thread_server(_store())
    with caplog.at_level(logging.INFO, logger="hfs.paramserver.client"):
        with _client(srv.endpoint) as client, _client(reference.endpoint, "off") as frames:
            assert [a.tobytes() for a in _traffic(client, with_select=False)] == \
                   [a.tobytes() for a in _traffic(frames, with_select=False)]
            assert client._wire.no_shm == {srv.endpoint}
    said = [r.message for r in caplog.records if "shared memory with" in r.message]
    assert len(said) == 1 and srv.endpoint in said[0]
    assert srv.server.stats.errors["shm"] == 1 and srv.server.stats.shm_bytes_in == 0


@pytest.mark.parametrize("pipeline", [False, True])
def test_an_idle_segment_dropped_by_the_server_is_attached_again(thread_server, pipeline):
    srv = thread_server(_store(), segment_idle_s=0.3)
    reference = thread_server(_store())
    with _client(srv.endpoint, pipeline=pipeline) as client, _client(reference.endpoint, "off") as frames:
        for step in range(2):
            rows = np.arange(step, C, 3)
            assert client.get_rows("fc", rows, step=step).tobytes() == frames.get_rows("fc", rows, step=step).tobytes()
            time.sleep(0.7)  # the server's housekeeping drops the idle mapping
            assert not srv.server._segments
            grads = np.full((rows.size, D), 0.01, np.float32)
            client.push_grads("fc", rows, grads, step)
            frames.push_grads("fc", rows, grads, step)
        assert client.get_rows("fc", np.arange(C)).tobytes() == frames.get_rows("fc", np.arange(C)).tobytes()
    # refused, then sent again; a pipelined push is refused together with the request that followed it
    refused = 4 if pipeline else 2
    assert srv.server.stats.count["shm"] >= 3 and srv.server.stats.errors["invalid"] == refused


# --------------------------------------------------------------------------- hostile requests


class RawPeer:
    """A DEALER socket speaking the protocol by hand."""

    def __init__(self, endpoint: str) -> None:
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RCVTIMEO, 10000)
        self.sock.connect(endpoint)
        self.ids = 0

    def ask(self, header: dict, frames=()) -> dict:
        self.ids += 1
        self.sock.send_multipart([json.dumps(dict(header, v=1, id=self.ids)).encode(), *frames])
        reply = proto.decode(self.sock.recv_multipart())
        assert reply.header["id"] == self.ids
        return reply.header

    def close(self) -> None:
        self.sock.close(0)


def _state(store: InProcessStore):
    m = store._matrix("fc")
    return m.weight.copy(), m.momentum.copy(), m.last_applied, dict(store._counters)


def _offer(folder: Path, **changes) -> tuple[shm.ClientSegment, dict]:
    segment = shm.ClientSegment.create(4096, 4096, folder=str(folder))
    return segment, dict({"op": "shm"}, **segment.offer.fields(), **changes)


def test_hostile_handshakes_are_refused(thread_server, tmp_path):
    folder = tmp_path.resolve()
    srv = thread_server(_store(), segment_folder=str(folder))
    peer = RawPeer(srv.endpoint)
    made = []
    try:
        good, _ = _offer(folder)
        made.append(good)
        elsewhere = folder / "sub"
        elsewhere.mkdir()
        outside, outside_offer = _offer(elsewhere)
        made.append(outside)
        link = folder / f"{shm.PREFIX}{os.getpid()}-{'a' * 32}"
        link.symlink_to(good.offer.path)
        public = folder / f"{shm.PREFIX}{os.getpid()}-{'b' * 32}"
        public.write_bytes(bytes(good.size))
        public.chmod(0o644)
        badname = folder / "hfs-ps-x.seg"
        badname.write_bytes(bytes(good.size))
        badname.chmod(0o600)
        fields = good.offer.fields()
        cases = {
            "nonce mismatch": dict(fields, nonce="0" * 32),
            "outside the folder": outside_offer,
            "dotted path": dict(fields, path=f"{folder}/sub/../{Path(good.offer.path).name}"),
            "symlink": dict(fields, path=str(link)),
            "not private": dict(fields, path=str(public)),
            "bad name": dict(fields, path=str(badname)),
            "missing file": dict(fields, path=str(folder / f"{shm.PREFIX}1-{'c' * 32}")),
            "wrong size": dict(fields, size=good.size + 64),
            "reply past the end": dict(fields, reply_offset=good.size + 64),
            "huge size": dict(fields, size=shm.MAX_SEGMENT_BYTES + 1),
            "nonce not hex": dict(fields, nonce="zz" * 16),
            "size not an int": dict(fields, size="4096"),
        }
        for what, offer in cases.items():
            offer = {k: v for k, v in offer.items() if k != "op"}
            reply = peer.ask(dict(offer, op="shm"))
            assert reply["ok"] is False, what
        assert not srv.server._segments
        assert peer.ask(dict(fields, op="shm"))["ok"] is True  # the real offer still works
    finally:
        peer.close()
        for segment in made:
            segment.close()


def test_hostile_shared_memory_requests_get_errors_and_change_nothing(thread_server, tmp_path):
    folder = tmp_path.resolve()
    store = _store()
    store.push_grads("fc", np.arange(C), np.ones((C, D), np.float32), 0)
    srv = thread_server(store, segment_folder=str(folder), max_message_bytes=1 << 20)
    attached, bare = RawPeer(srv.endpoint), RawPeer(srv.endpoint)
    segment, offer = _offer(folder)
    try:
        assert attached.ask(offer)["ok"] is True
        segment.unlink()
        rows = segment.array(np.dtype("<i8"), (4,), shm.DATA_OFFSET)
        rows[:] = [1, 2, 3, 4]
        before = _state(store)
        i8, f4 = "int64", "float32"
        end = segment.size
        bad = [
            {"op": "get", "matrix": "fc", "arrays": [{"dtype": i8, "shape": [4], "shm": end}]},
            {"op": "get", "matrix": "fc", "arrays": [{"dtype": i8, "shape": [4], "shm": end - 8}]},
            {"op": "get", "matrix": "fc", "arrays": [{"dtype": i8, "shape": [4], "shm": -64}]},
            {"op": "get", "matrix": "fc", "arrays": [{"dtype": i8, "shape": [4], "shm": 0}]},  # the nonce
            {"op": "get", "matrix": "fc", "arrays": [{"dtype": i8, "shape": [4], "shm": shm.DATA_OFFSET + 4}]},
            {"op": "get", "matrix": "fc", "arrays": [{"dtype": i8, "shape": [4], "shm": "64"}]},
            {"op": "get", "matrix": "fc", "arrays": [{"dtype": i8, "shape": [4], "shm": 1.5}]},
            {"op": "get", "matrix": "fc", "arrays": [{"dtype": i8, "shape": [4], "shm": True}]},
            {"op": "get", "matrix": "fc", "arrays": [{"dtype": "float64", "shape": [4], "shm": 64}]},
            {"op": "get", "matrix": "fc", "arrays": [{"dtype": f4, "shape": [4], "shm": 64}]},
            {"op": "get", "matrix": "fc", "arrays": [{"dtype": i8, "shape": [2**39], "shm": 64}]},
            {"op": "push", "matrix": "fc", "step": 1,
             "arrays": [{"dtype": i8, "shape": [4], "shm": 64}, {"dtype": f4, "shape": [4, D], "shm": end - 64}]},
            {"op": "push", "matrix": "fc", "step": 1,
             "arrays": [{"dtype": i8, "shape": [4], "shm": 64}, {"dtype": f4, "shape": [4, D + 1], "shm": 128}]},
            {"op": "set", "matrix": "fc",
             "arrays": [{"dtype": f4, "shape": [4, D], "shm": 128}, {"dtype": i8, "shape": [4], "shm": 64}]},
            {"op": "push", "matrix": "fc", "step": 1,  # more shared bytes than the server accepts
             "arrays": [{"dtype": i8, "shape": [4], "shm": 64}, {"dtype": f4, "shape": [4, 2**16], "shm": 128}]},
        ]
        for header in bad:
            assert attached.ask(header)["ok"] is False, header
        segment.array(np.dtype("<f4"), (4, D), 128)[:] = 1.0
        good_push = {"op": "push", "matrix": "fc", "step": 1,
                     "arrays": [{"dtype": i8, "shape": [4], "shm": 64}, {"dtype": f4, "shape": [4, D], "shm": 128}]}
        reply = bare.ask(good_push)  # no segment attached on this connection
        assert reply["ok"] is False and reply["error"].startswith(proto.NO_SEGMENT_ERROR)
        after = _state(store)
        for x, y in zip(before, after):
            assert (np.array_equal(x, y) if isinstance(x, np.ndarray) else x == y)
        assert attached.ask(good_push)["ok"] is True  # and the connection still works
        assert store.last_applied("fc") == 1
    finally:
        attached.close()
        bare.close()
        segment.close()


# --------------------------------------------------------------------------- nothing left behind


def _leftovers(pid: int) -> list[str]:
    return [n for n in os.listdir(shm.segment_folder()) if n.startswith(f"{shm.PREFIX}{pid}-")]


def test_no_segment_file_is_left_while_running_or_after_close(thread_server):
    srv = thread_server(_store())
    client = _client(srv.endpoint)
    try:
        client.get_rows("fc", np.arange(5))
        assert srv.server._segments and not _leftovers(os.getpid())
    finally:
        client.close()
    assert not _leftovers(os.getpid())


CHILD = """
import sys, numpy as np
from hfs.paramserver.client import ParamClient
client = ParamClient(sys.argv[1], timeout_s=10)
step = 0
while True:
    rows = np.arange(step % 50, 300, 7)
    client.get_rows("fc", rows, step=step)
    client.push_grads("fc", rows, np.full((rows.size, 8), 1e-3, np.float32), step)
    if step == 2:
        print("ready", flush=True)
    step += 1
"""


def test_a_killed_client_leaves_no_file_and_the_server_lives_on(thread_server):
    srv = thread_server(_store())
    child = subprocess.Popen([sys.executable, "-c", CHILD, srv.endpoint], stdout=subprocess.PIPE, text=True,
                             env=dict(os.environ, PYTHONPATH=str(REPO)))
    try:
        assert child.stdout.readline().strip() == "ready"
        assert srv.server._segments
        os.kill(child.pid, signal.SIGKILL)
        child.wait(10)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(10)
    assert not _leftovers(child.pid)
    with _client(srv.endpoint) as client:  # the server still answers, through a new segment
        step = client.last_applied("fc") + 1
        rows = np.arange(10)
        before = client.get_rows("fc", rows, step=step)
        client.push_grads("fc", rows, np.zeros((10, D), np.float32), step)
        assert np.isfinite(before).all() and client.last_applied("fc") == step


def test_a_stale_segment_of_a_dead_creator_is_swept(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f"{shm.PREFIX}{dead.pid}-{'d' * 32}"
    stale.write_bytes(b"x")
    old = time.time() - 2 * shm.STALE_AFTER_S
    os.utime(stale, (old, old))
    fresh = tmp_path / f"{shm.PREFIX}{dead.pid}-{'e' * 32}"
    fresh.write_bytes(b"x")  # too young: may be a handshake in progress
    segment = shm.ClientSegment.create(64, 64, folder=str(tmp_path))
    segment.close()
    assert not stale.exists() and fresh.exists() and not Path(segment.offer.path).exists()


def test_decode_refuses_shared_arrays_without_a_segment():
    frames = proto.encode({"op": "get", "matrix": "fc"}, [proto.InSegment(np.dtype("<i8"), (3,), 64)])
    with pytest.raises(proto.ProtocolError, match="no shared-memory segment"):
        proto.decode(frames)
    assert json.loads(frames[0])["arrays"] == [{"dtype": "int64", "shape": [3], "shm": 64}] and len(frames) == 1


def test_the_config_key_reaches_server_and_client(thread_server):
    from hfs.config import ConfigError, load_config
    from hfs.paramserver import open_store
    from hfs.paramserver.launch import ServeOptions, serve_options

    off = load_config(None, ["paramserver.shared_memory=off"])
    opts = serve_options(off)
    assert opts.shared_memory is False and serve_options(load_config(None, [])).shared_memory is True
    assert ServeOptions.from_json(opts.to_json(), None).shared_memory is False  # shard processes get it too
    srv = thread_server(_store())
    cfg = load_config(None, ["paramserver.shared_memory=off", f"paramserver.address={srv.endpoint}"])
    with open_store(cfg.paramserver, None) as client:
        client.get_rows("fc", np.arange(4))
        assert client.shared_memory == "off" and srv.server.stats.count["shm"] == 0
    with pytest.raises(ConfigError, match="shared_memory"):
        load_config(None, ["paramserver.shared_memory=sometimes"])


def test_a_bare_off_in_yaml_means_off(tmp_path):
    from hfs.config import load_config

    path = tmp_path / "c.yaml"
    path.write_text("paramserver:\n  shared_memory: off\n")  # YAML 1.1 reads this as false
    assert load_config(path, []).paramserver.shared_memory == "off"


def test_a_full_shm_folder_falls_back_to_frames(thread_server, monkeypatch):
    import errno

    def full(fd, size):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shm, "_reserve", full)
    srv = thread_server(_store())
    with _client(srv.endpoint) as client:
        got = client.get_rows("fc", np.arange(C))
        assert client._wire.no_shm == {srv.endpoint} and not _leftovers(os.getpid())
    assert got.tobytes() == srv.server.store.get_rows("fc", np.arange(C)).tobytes()


def test_a_segment_that_cannot_grow_keeps_serving_small_arrays(thread_server, monkeypatch):
    import errno

    store = InProcessStore(None, timeout_s=10)
    rows = (shm.DEFAULT_REGION_BYTES // (64 * 4)) + 100
    store.create("big", rows, 64, seed=2)
    srv = thread_server(store)
    with _client(srv.endpoint) as client:
        small = client.get_rows("big", np.arange(8))
        attached = srv.server.stats.count["shm"]

        def full(fd, size):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(shm, "_reserve", full)
        every = np.arange(rows)
        for _ in range(2):  # the first comes as frames and asks for a bigger region; that fails
            assert client.get_rows("big", every).tobytes() == store.get_rows("big", every).tobytes()
        before = srv.server.stats.shm_bytes_out
        assert client.get_rows("big", np.arange(8)).tobytes() == small.tobytes()
        assert srv.server.stats.shm_bytes_out > before and not client._wire.no_shm
        assert srv.server.stats.count["shm"] == attached and not _leftovers(os.getpid())


def test_signed_messages_still_work_with_shared_memory(thread_server):
    from hfs.paramserver.client import ParamClient

    srv = thread_server(_store(), secret=b"k" * 16)
    reference = thread_server(_store())
    with ParamClient(srv.endpoint, timeout_s=10, secret=b"k" * 16) as client, _client(reference.endpoint, "off") as frames:
        assert [a.tobytes() for a in _traffic(client, with_select=False)] == \
               [a.tobytes() for a in _traffic(frames, with_select=False)]
    assert srv.server.stats.shm_bytes_in > 0 and srv.server.stats.errors["invalid"] == 0
