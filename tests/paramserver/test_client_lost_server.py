"""A parameter server that stops answering mid-training (issue 15, item 5): the client warns
within seconds and then fails with the commands that recover the run."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from hfs.paramserver.client import ParamClient
from hfs.paramserver.store import InProcessStore
from hfs.utils.errors import HfsError


@pytest.mark.slow
def test_dead_server_warns_early_then_says_how_to_recover(thread_server, tmp_path, caplog):
    srv = thread_server(InProcessStore(tmp_path / "snaps", timeout_s=10))
    client = ParamClient(srv.endpoint, timeout_s=4.5, connect_timeout_s=5)
    try:
        client.create("fc", 10, 4)
        client.resume_hint = f"hfs train --resume {tmp_path / 'run'}"
        srv.stop()  # killed mid-training: nothing answers any more
        port = srv.endpoint.rsplit(":", 1)[1]
        with caplog.at_level(logging.WARNING, logger="hfs.paramserver.client"):
            with pytest.raises(HfsError) as err:
                client.get_rows("fc", np.arange(3))
    finally:
        client.close()
    waits = [r.getMessage() for r in caplog.records if "waiting for the parameter server" in r.getMessage()]
    assert waits and waits[0] == f"waiting for the parameter server at {srv.endpoint} (3 s)"
    text = str(err.value)
    assert "did not answer 'get' within 4.5 s" in text
    assert f"hfs serve-params --port {port} --snapshot-dir {tmp_path / 'snaps'} --resume latest" in text
    assert f"hfs train --resume {tmp_path / 'run'}" in text


def test_training_sets_the_resume_hint(tiny_cfg_module):
    from hfs.train.run_dir import resume_hint

    cfg = tiny_cfg_module("train.output_dir=/x/run")
    assert resume_hint(cfg, launched=False) == "hfs train --resume /x/run"
    assert resume_hint(cfg, launched=True) == "hfs train-dist --resume /x/run"


def test_the_sampled_classifier_hands_the_hint_to_its_store_client(thread_server, tiny_cfg_module):
    """The trainer puts the hint in the classifier's context; it never reaches into the layer's store."""
    import contextlib

    import torch

    from hfs.dist import DistEnv
    from hfs.fc.layer import ClassifierContext, build_classifier
    from hfs.models import build_head

    srv = thread_server()
    cfg = tiny_cfg_module("fc.mode=sampled", "fc.sample_num=4", "model.embedding_size=4", "sampler.type=random",
                          f"paramserver.address={srv.endpoint}", "paramserver.shared_memory=off")
    with contextlib.ExitStack() as stack:
        fc = build_classifier(cfg, ClassifierContext(num_classes=10, head=build_head(cfg.head),
                                                     device=torch.device("cpu"), env=DistEnv(), stack=stack,
                                                     resume_hint="hfs train --resume /x/run"))
        assert fc.store.resume_hint == "hfs train --resume /x/run"


@pytest.fixture
def tiny_cfg_module():
    from hfs.config import load_config

    return lambda *o: load_config(None, list(o))
