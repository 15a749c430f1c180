"""`select` and `index` over the wire: shards merged by score, one round trip per step, bad requests refused."""

from __future__ import annotations


import numpy as np
import pytest

from hfs.paramserver import protocol as proto
from hfs.paramserver.base import HParams
from hfs.paramserver.sharding import ShardSpec
from hfs.paramserver.store import InProcessStore
from hfs.samplers.owned import IndexSpec
from hfs.samplers.selection import SelectionRule
from hfs.samplers.shards import rule_to_fields

pytest.importorskip("zmq")
C, D, B = 240, 8, 10
EXACT = IndexSpec(sampler="exact", kwargs={"metric": "cosine", "chunk": 64, "device": "cpu"}, background=False,
                  refresh="interval")


def _store(shard=ShardSpec()):
    store = InProcessStore(None, timeout_s=10, shard=shard)
    store.create("fc", C, D, init="gaussian", std=0.5, seed=4)
    store.set_hparams("fc", HParams(0.3, 0.9))
    return store


def _batch(seed):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((B, D)).astype(np.float32), rng.integers(0, C, B).astype(np.int64)


@pytest.mark.parametrize("count,options", [(1, {}), (2, {}), (3, {}),
                                           (1, {"candidate_pick": "score", "logq": True, "hard_fraction": 0.7}),
                                           (3, {"candidate_pick": "score", "logq": True, "hard_fraction": 0.7})])
def test_select_over_shards_gives_the_single_store_active_set(thread_server, count, options):
    from hfs.paramserver.client import ParamClient

    whole = _store()
    whole.attach_index("fc", EXACT)
    servers = [thread_server(_store(ShardSpec(i, count))) for i in range(count)]
    client = ParamClient([s.endpoint for s in servers], timeout_s=10)
    try:
        assert client.attach_index("fc", EXACT) and not client.attach_index("fc", EXACT)
        rule = SelectionRule(50, seed=3, **options)  # the rule's options travel as its fields
        rng = np.random.default_rng(0)
        for step in range(3):
            features, labels = _batch(step)
            expected, expected_rows = whole.select("fc", features, labels, step, rule, 6)
            chosen, rows = client.select("fc", features, labels, step, rule, 6)
            np.testing.assert_array_equal(chosen.active, expected.active)
            np.testing.assert_array_equal(chosen.local, expected.local)
            np.testing.assert_allclose(rows, expected_rows, rtol=1e-6, atol=1e-6)
            if rule.logq:
                assert expected.logit_adjust is not None and np.any(expected.logit_adjust > 0)
                np.testing.assert_allclose(chosen.logit_adjust, expected.logit_adjust, rtol=1e-5, atol=1e-6)
            else:
                assert chosen.logit_adjust is None
            grads = rng.standard_normal((len(chosen.active), D)).astype(np.float32)
            whole.push_grads("fc", chosen.active, grads, step)
            client.push_grads("fc", chosen.active, grads, step)
        stats = client.index_stats("fc")
        assert stats["index_ready"] and stats["builds"] == count  # one build per shard, not per client
    finally:
        client.close()


def test_one_shard_answers_selection_and_rows_in_one_round_trip(thread_server):
    from hfs.paramserver.client import ParamClient

    srv = thread_server(_store())
    client = ParamClient(srv.endpoint, timeout_s=10)
    try:
        client.attach_index("fc", EXACT)
        for step in range(3):
            features, labels = _batch(step)
            chosen, rows = client.select("fc", features, labels, step, SelectionRule(30, seed=1), 5)
            client.push_grads("fc", chosen.active, np.ones_like(rows), step)
        ops = client.server_stats()[0]["server"]["ops"]
        assert ops["select"]["requests"] == 3 and ops["push"]["requests"] == 3 and "get" not in ops
    finally:
        client.close()


def _frames(header, arrays=()):
    return proto.encode(header, arrays)


def _bad_requests(features, labels):
    good = {"op": "select", "matrix": "fc", "step": 0, "k": 5, "rows": True, "rule": rule_to_fields(SelectionRule(20))}
    nan = features.copy()
    nan[0, 0] = np.nan
    wide = np.zeros((B, D + 1), np.float32)
    yield dict(good), [nan, labels]
    yield dict(good), [wide, labels]
    yield dict(good), [features, labels[:-1]]
    yield dict(good), [features]
    yield dict(good), [labels.astype(np.float32).reshape(-1, 1), labels]
    yield dict(good, k=10**9), [features, labels]
    yield dict(good, k=-3), [features, labels]
    yield dict(good, k="5"), [features, labels]
    yield dict(good, step=None), [features, labels]
    yield dict(good, rule={"sample_num": 20, "colour": "red"}), [features, labels]
    yield dict(good, rule={"sample_num": "20"}), [features, labels]
    yield dict(good, rule={"sample_num": True}), [features, labels]
    yield dict(good, rule=[20]), [features, labels]
    yield dict(good, rule={}), [features, labels]
    yield dict(good, rows=False, k=10**9), [features, labels]
    yield dict(good), [features, np.full(B, C, np.int64)]
    yield {"op": "index", "matrix": "fc", "spec": {"sampler": "faiss"}}, []
    yield {"op": "index", "matrix": "fc", "spec": {"sampler": "exact", "interval": "7"}}, []
    yield {"op": "index", "matrix": "fc", "spec": {"sampler": "exact", "kwargs": {"bogus": 1}}}, []
    yield {"op": "index", "matrix": "fc", "spec": {"sampler": "exact", "interval": 0}}, []
    yield {"op": "index", "matrix": "fc", "spec": {"sampler": "exact", "extra": 1}}, []
    yield {"op": "index", "matrix": "fc", "spec": "exact"}, []
    yield {"op": "index", "matrix": "nope", "spec": EXACT.to_json()}, []


def test_fuzzed_select_and_index_get_error_replies_and_change_nothing(thread_server):
    zmq = pytest.importorskip("zmq")
    store = _store()
    store.attach_index("fc", EXACT)
    before = store._matrix("fc").weight.copy()
    counters = {k: store.stats()[k] for k in ("selects", "index_attaches")}
    srv = thread_server(store)
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 10000)
    sock.connect(srv.endpoint)
    features, labels = _batch(0)
    try:
        for i, (header, arrays) in enumerate(_bad_requests(features, labels)):
            sock.send_multipart(_frames(dict(header, id=i), arrays))
            reply = proto.decode(sock.recv_multipart()).header
            assert reply["ok"] is False and not reply["error"].startswith("internal error"), (header, reply)
        sock.send_multipart(_frames({"op": "stats", "id": 99}))
        stats = proto.decode(sock.recv_multipart()).header["stats"]["store"]
    finally:
        sock.close(0)
    assert {k: stats[k] for k in counters} == counters
    assert stats["indexes"]["fc"]["builds"] == 1
    np.testing.assert_array_equal(store._matrix("fc").weight, before)
