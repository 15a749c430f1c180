"""SampledFC over a served store whose pushes do not wait (paramserver.pipeline_pushes): the
rows come out bit for bit as with the in-process store, with no push thread."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from hfs.fc import SampledFC
from hfs.models.heads import ArcFaceHead
from hfs.paramserver.store import InProcessStore
from hfs.samplers import SelectionRule

pytest.importorskip("zmq")
C, D, B = 40, 6, 8


def _train(store, steps: int = 4, accum: int = 2) -> np.ndarray:
    torch.manual_seed(0)
    store.create("fc", C, D, init="gaussian", std=0.3, seed=1, exist_ok=True)
    sampled = SampledFC(store, ArcFaceHead(8.0, 0.3), rule=SelectionRule(12, seed=3))
    try:
        for step in range(steps):
            sampled.set_hparams(0.5 / (1 + step), 0.9, 0.01)
            feats, labels = torch.randn(accum, B, D), torch.randint(0, C, (accum, B))
            for i in range(accum):
                (sampled(feats[i], labels[i], step, last_micro=i == accum - 1).loss / accum).backward()
            sampled.after_backward()
            if getattr(store, "pipeline_pushes", False):
                pending = [c.pending is not None for c in store._wire.connections()]
                assert sampled._pool is None and sum(pending) == 1  # sent, not waited for
            sampled.end_step(step)
        return np.concatenate([rows for _, rows in sampled.iter_chunks()])  # flushes the last push
    finally:
        sampled.close()


@pytest.mark.parametrize("pipeline", [True, False])
def test_sampled_fc_over_a_served_store_matches_the_in_process_one(pipeline):
    from hfs.paramserver.client import ParamClient
    from hfs.paramserver.server import ParamServer

    want = _train(InProcessStore(None))
    server = ParamServer(InProcessStore(None, timeout_s=10), "tcp://127.0.0.1:0")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with ParamClient(server.endpoint, timeout_s=10, pipeline_pushes=pipeline) as client:
            got = _train(client)
            assert server.store.last_applied("fc") == 3
    finally:
        server.stop()
        thread.join(10)
        server.close()
    assert got.tobytes() == want.tobytes()
