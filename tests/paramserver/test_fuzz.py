"""Thousands of malformed messages: each gets an error reply, the server lives, nothing changes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from hfs.paramserver import protocol as proto
from hfs.paramserver.base import HParams
from hfs.paramserver.store import InProcessStore

ROWS, DIM = 100, 4
MAX_BYTES = 256 * 1024


def _frames(header, arrays=(), raw_header: bytes | None = None) -> list[bytes]:
    """A message with a hand-made header; arrays go out as described by header['arrays']."""
    head = raw_header if raw_header is not None else json.dumps(header).encode()
    return [head] + [np.ascontiguousarray(a).tobytes() for a in arrays]


def _spec(*arrays) -> list[dict]:
    return [{"dtype": a.dtype.name, "shape": list(a.shape)} for a in arrays]


def pick(rng: np.random.Generator, options):
    """One of ``options`` (any Python objects), chosen by ``rng``."""
    return options[int(rng.integers(len(options)))]


def _malformed(rng: np.random.Generator, i: int) -> list[bytes]:
    """One message that a correct server must refuse; the kind cycles, the details are random."""
    rows = rng.integers(0, ROWS, int(rng.integers(1, 20)))
    vals = rng.standard_normal((rows.size, DIM)).astype(np.float32)
    base = {"v": 1, "id": i, "matrix": "fc"}
    kind = i % 24
    if kind == 0:
        return [rng.bytes(int(rng.integers(0, 200))) for _ in range(int(rng.integers(1, 4)))]
    if kind == 1:
        return _frames(None, raw_header=pick(rng, ["[1,2]", "3", '"op"', "null"]).encode())
    if kind == 2:
        return _frames(dict(base, op="ping", v=pick(rng, [0, 2, 99, -1])))
    if kind == 3:
        return _frames({"id": i, "op": "ping", "v": pick(rng, ["1", None, 1.5, True])})
    if kind == 4:
        return _frames(dict(base, op="".join((pick(rng, "abcxyz_") for _ in range(6)))))
    if kind == 5:
        return _frames({"v": 1, "op": "ping", "id": pick(rng, ["7", 1.5, None, [1]])})
    if kind == 6:  # frame count differs from the header
        return _frames(dict(base, op="push", step=0, arrays=_spec(rows, vals)), [rows])
    if kind == 7:  # a dtype the protocol does not carry
        bad = rows.astype(pick(rng, [np.int32, np.float64, np.uint8]))
        return _frames(dict(base, op="get", arrays=[{"dtype": bad.dtype.name, "shape": list(bad.shape)}]), [bad])
    if kind == 8:  # byte length does not match the shape
        return _frames(dict(base, op="set", arrays=[{"dtype": "int64", "shape": [rows.size + 1]},
                                                     {"dtype": "float32", "shape": [rows.size, DIM]}]), [rows, vals])
    if kind == 9:  # rows out of range
        out = rows.copy()
        out[int(rng.integers(0, out.size))] = pick(rng, [ROWS, ROWS + 10**6, -1, -(2**40)])
        op = pick(rng, ["get", "set", "push"])
        arrays = [out] if op == "get" else [out, vals]
        return _frames(dict(base, op=op, step=0, arrays=_spec(*arrays)), arrays)
    if kind == 10:  # values of the wrong width
        wide = rng.standard_normal((rows.size, DIM + 1)).astype(np.float32)
        return _frames(dict(base, op=pick(rng, ["set", "push"]), step=0, arrays=_spec(rows, wide)), [rows, wide])
    if kind == 11:  # swapped dtypes (values as int64, rows as float32)
        return _frames(dict(base, op="push", step=0, arrays=_spec(vals, rows)), [vals, rows])
    if kind == 12:  # step missing or of the wrong type
        step = pick(rng, ["1", 1.5, None, True, 2**70])
        return _frames(dict(base, op="push", step=step, arrays=_spec(rows, vals)), [rows, vals])
    if kind == 13:  # non-finite gradients
        vals[0, 0] = pick(rng, [np.nan, np.inf, -np.inf])
        return _frames(dict(base, op="push", step=0, arrays=_spec(rows, vals)), [rows, vals])
    if kind == 14:  # bad create fields
        fields = pick(rng, [{"rows": -5, "dim": 4}, {"rows": 2**50, "dim": 4}, {"rows": 10, "dim": 0},
                             {"rows": 10, "dim": 4, "init": "he"}, {"rows": 10, "dim": 4, "seed": -1},
                             {"rows": 10, "dim": 4, "std": float("nan")}, {"rows": "10", "dim": 4},
                             {"rows": 10**9, "dim": 10**5}, {"rows": ROWS, "dim": DIM}])
        return _frames(dict(base, op="create", matrix=pick(rng, ["fc", "x"]) if fields["rows"] != ROWS else "fc",
                            **fields))
    if kind == 15:  # bad hparams
        hp = pick(rng, [{"lr": -0.1}, {"lr": "0.1"}, {"lr": 0.1, "momentum": -1.0}, {}, {"lr": float("inf")}])
        return _frames(dict(base, op="hparams", **hp))
    if kind == 16:  # snapshot names that are paths
        tag = pick(rng, ["../up", "/abs/path", "a/b", "..", ".hidden", "x" * 300, 5])
        return _frames(dict(base, op=pick(rng, ["snapshot", "restore"]), tag=tag))
    if kind == 17:  # too big in total
        big = np.zeros(MAX_BYTES // 4 + int(rng.integers(1, 1000)), np.float32)
        return _frames(dict(base, op="push", step=0, arrays=_spec(rows, big)), [rows, big])
    if kind == 18:  # header too large
        return _frames(None, raw_header=json.dumps(dict(base, op="ping", pad="x" * proto.MAX_HEADER_BYTES)).encode())
    if kind == 19:  # too many arrays / arrays not a list
        spec = pick(rng, ["nope", [{"dtype": "int64", "shape": [0]}] * 9, [{"dtype": "int64", "shape": [2, 2, 2]}],
                           [{"dtype": "int64", "shape": [-1]}], [{"dtype": "int64"}], [5]])
        return _frames(dict(base, op="get", arrays=spec))
    if kind == 20:  # unknown, missing or non-string matrix
        matrix = pick(rng, ["nope", "", None, 3, ["fc"]])
        return _frames(dict(base, op="get", matrix=matrix, arrays=_spec(rows)), [rows])
    if kind == 21:  # bad worker names
        return _frames(dict(base, op=pick(rng, ["register", "leave"]), worker=pick(rng, ["", 7, None])))
    if kind == 22:  # bad ranges
        start, stop = pick(rng, [(-1, 5), (5, ROWS + 1), (10, 5), ("0", 5)])
        return _frames(dict(base, op="get", start=start, stop=stop))
    # step already applied, duplicate push of a pending step is covered by the store tests
    return _frames(dict(base, op="push", step=-1, arrays=_spec(rows, vals)), [rows, vals])


@pytest.mark.parametrize("req_envelope", [False, True])
def test_fuzzed_messages_get_error_replies_and_change_nothing(thread_server, tmp_path, req_envelope):
    zmq = pytest.importorskip("zmq")
    store = InProcessStore(tmp_path, timeout_s=10)
    store.create("fc", ROWS, DIM, seed=3)
    store.set_hparams("fc", HParams(0.1, 0.9, 1e-4))
    store.push_grads("fc", np.arange(ROWS), np.ones((ROWS, DIM), np.float32), 0)
    before = (store._matrix("fc").weight.copy(), store._matrix("fc").momentum.copy())
    srv = thread_server(store, max_message_bytes=MAX_BYTES)
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 10000)
    sock.connect(srv.endpoint)
    rng = np.random.default_rng(12345 + req_envelope)
    count, batch = 2400, 48
    errors: dict[int, str] = {}
    try:
        for first in range(0, count, batch):
            delimited = []
            for i in range(first, first + batch):
                frames = ([b""] if req_envelope else []) + _malformed(rng, i)
                # An empty first frame is a REQ-style delimiter (echoed), and frames follow it.
                delimited.append(len(frames) > 1 and frames[0] == b"")
                sock.send_multipart(frames)
            for expect_delimiter in delimited:
                reply = sock.recv_multipart()
                if expect_delimiter:
                    assert reply[0] == b""
                    reply = reply[1:]
                msg = proto.decode(reply)
                assert msg.header["ok"] is False, msg.header
                text = msg.header["error"]
                assert text and not text.startswith("internal error"), text
                errors[len(errors)] = text
        pong = proto.decode(_roundtrip(sock, _frames({"v": 1, "id": 1, "op": "ping"}), req_envelope)).header
        assert pong["ok"] and pong["matrices"]["fc"]["rows"] == ROWS
    finally:
        sock.close(0)
    assert len(errors) == count
    np.testing.assert_array_equal(store._matrix("fc").weight, before[0])
    np.testing.assert_array_equal(store._matrix("fc").momentum, before[1])
    assert not [p for p in tmp_path.iterdir()]  # no snapshot escaped or was written
    texts = " | ".join(errors.values())
    for expected in ("unknown op", "protocol version", "out of range", "exceeds the limit", "plain name",
                     "NaN", "not UTF-8 JSON", "float32"):
        assert expected in texts, expected


def _roundtrip(sock, frames, req_envelope: bool) -> list[bytes]:
    sock.send_multipart(([b""] if req_envelope else []) + frames)
    reply = sock.recv_multipart()
    return reply[1:] if req_envelope else reply
