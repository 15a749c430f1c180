"""Index builds against `hfs serve-params` open their client from the store's own ReaderSpec:
the configured timeouts (``paramserver.connect_timeout_s`` too) and the secret reach the
build's thread and its child process, and the secret never reaches a command line."""

from __future__ import annotations

import json
import threading

import pytest

from hfs.config import load_config
from hfs.paramserver import SECRET_ENV, open_store
from hfs.paramserver.base import ReaderSpec
from hfs.paramserver.client import ParamClient
from hfs.paramserver.server import ParamServer
from hfs.paramserver.store import InProcessStore
from hfs.samplers import build_sampler, build_selector
from hfs.samplers.build_worker import build_index_file
from hfs.samplers.refresh import RemoteMatrix

C, D = 300, 8
SECRET = b"s3cret"


@pytest.fixture
def server():
    srv = ParamServer(InProcessStore(timeout_s=10), "tcp://127.0.0.1:0", secret=SECRET)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    with ParamClient(srv.endpoint, secret=SECRET) as client:
        client.create("fc", C, D, seed=1)
    yield srv
    srv.stop()
    thread.join(10)
    srv.close()


@pytest.fixture
def opened(monkeypatch):
    """Every ParamClient opened from now on, as (endpoints, timeout_s, connect_timeout_s, secret)."""
    seen: list[tuple] = []
    real_init = ParamClient.__init__

    def recording_init(self, address, *, timeout_s=60.0, connect_timeout_s=10.0, secret=None):
        real_init(self, address, timeout_s=timeout_s, connect_timeout_s=connect_timeout_s, secret=secret)
        seen.append((tuple(self.endpoints), timeout_s, connect_timeout_s, secret))

    monkeypatch.setattr(ParamClient, "__init__", recording_init)
    return seen


def _store_cfg(server: ParamServer):
    return load_config(None, [f"paramserver.address={server.endpoint}", "paramserver.timeout_s=7",
                              "paramserver.connect_timeout_s=2.5", "sampler.type=exact", "sampler.background=false",
                              "fc.sample_num=40"])


def test_in_process_store_has_no_reader_spec():
    assert InProcessStore().reader_spec() is None


def test_connect_timeout_reaches_the_build_threads_client(server, opened, monkeypatch):
    monkeypatch.setenv(SECRET_ENV, SECRET.decode())  # how the config's store gets the secret here
    cfg = _store_cfg(server)
    store = open_store(cfg.paramserver, None)
    try:
        assert store.reader_spec() == ReaderSpec((server.endpoint,), 7.0, 2.5, SECRET)
        opened.clear()
        selector = build_selector(cfg.sampler, store=store, num_classes=C, sample_num=40, queries_per_step=8,
                                  seed=0, metric=cfg.sampler_metric)
        selector.maybe_refresh(0)
        assert selector.wait_ready(60) and selector.index_ready
        selector.close()
    finally:
        store.close()
    assert opened == [((server.endpoint,), 7.0, 2.5, SECRET)]  # the foreground build read through its own client


def test_connect_timeout_and_secret_reach_the_build_process(server, opened, monkeypatch, tmp_path):
    monkeypatch.delenv(SECRET_ENV, raising=False)
    with ParamClient(server.endpoint, timeout_s=7, connect_timeout_s=2.5, secret=SECRET) as client:
        remote = RemoteMatrix(client.reader_spec(), "fc", 100)
    # What build_in_child hands its child: the spec on the command line, the secret in the environment.
    source_json = json.dumps({"remote": remote.spec(), "shape": [C, D]})
    assert SECRET.decode() not in source_json
    child_env = remote.reader.child_env()
    assert child_env == {SECRET_ENV: SECRET.decode()}
    for key, value in child_env.items():
        monkeypatch.setenv(key, value)
    opened.clear()
    sampler = build_sampler("annoy", load_config(None, ["sampler.annoy_trees=2"]).sampler, "cosine")
    spec_json = json.dumps({"name": sampler.name, "kwargs": sampler.spec()})
    build_index_file(spec_json, source_json, str(tmp_path / "index.bin"))
    assert opened == [((server.endpoint,), 7.0, 2.5, SECRET)]
    assert (tmp_path / "index.bin").is_file()


def test_reader_spec_round_trips_through_a_child_environment():
    spec = ReaderSpec(("tcp://127.0.0.1:1", "tcp://127.0.0.1:2"), 3.0, 0.5, b"hush-hush")
    assert ReaderSpec.from_child(json.loads(json.dumps(spec.public())), spec.child_env()) == spec
    plain = ReaderSpec(("tcp://127.0.0.1:1",), 3.0, 0.5)
    assert plain.child_env() == {} and ReaderSpec.from_child(plain.public(), {}) == plain
    assert "hush" not in repr(spec)  # the secret stays out of logs and tracebacks too
