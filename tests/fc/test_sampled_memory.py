"""A sampled trainer against `hfs serve-params` holds nothing that grows with C: the index lives in the server."""

from __future__ import annotations

import signal
import time
import tracemalloc
from pathlib import Path

import pytest
import torch

from hfs.utils.process import kill_if_running, start_serve_params

REPO = Path(__file__).resolve().parents[2]
C, D, B = 1_000_000, 8, 16


def test_trainer_memory_at_a_million_classes_does_not_grow_with_c(tmp_path):
    pytest.importorskip("zmq")
    pytest.importorskip("annoy")
    from hfs.config import load_config
    from hfs.fc.factories import attach_sampled_index, create_matrix, plan_classifier, sampled_layer
    from hfs.models.heads import ArcFaceHead
    from hfs.paramserver.client import ParamClient

    server, address = start_serve_params(tmp_path / "snaps", env={"PYTHONPATH": str(REPO)}, cwd=REPO)
    cfg = load_config(None, [f"model.embedding_size={D}", "sampler.type=annoy", "sampler.annoy_trees=1",
                             "fc.sample_num=64", f"train.batch_size={B}", f"paramserver.address={address}"])
    client = None
    try:
        deadline = time.monotonic() + 60
        while client is None:
            try:
                client = ParamClient(cfg.paramserver.address, timeout_s=60, connect_timeout_s=2)
            except Exception:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise
        plan = plan_classifier(cfg, C, 0, output_dir=tmp_path)
        create_matrix(client, cfg, C, seed=0)
        tracemalloc.start()
        assert attach_sampled_index(cfg, client, C, plan)  # the server snapshots its rows and builds annoy
        fc = sampled_layer(cfg, client, ArcFaceHead(), C, plan)
        fc.set_hparams(0.1, 0.9, 0.0)
        for step in range(4):
            feats = torch.randn(B, D, requires_grad=True)
            fc(feats, torch.randint(0, C, (B,)), step).loss.backward()
            fc.end_step(step)
        fc.settle()
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        stats = fc.index_stats()
        fc.close()
        assert stats["shards"][0]["sampler"] == "annoy"  # the server, not the trainer, holds the index
        assert peak < C * D * 4 / 20, f"trainer allocated {peak / 2**20:.1f} MiB at peak for a {C * D * 4 / 2**20:.0f} MiB matrix"
    finally:
        if client is not None:
            client.close()
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(30)
        finally:
            kill_if_running(server)
            server.wait(10)
