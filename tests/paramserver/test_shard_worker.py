"""`hfs serve-params --shards N` starts each shard from the server module with serialised
options (as index builds start their worker), not by re-entering the command line."""

from __future__ import annotations

import sys

from hfs.config import load_config
from hfs.paramserver import SECRET_ENV
from hfs.paramserver import launch as launch_mod
from hfs.paramserver.launch import ServeOptions, serve_options, start_shard
from hfs.paramserver.sharding import ShardSpec


def test_serve_options_come_from_the_config_once(tmp_path):
    cfg = load_config(None, [f"train.output_dir={tmp_path}", "paramserver.keep_snapshots=5",
                             "paramserver.snapshot_every_steps=7", "paramserver.max_message_mb=2",
                             "paramserver.secret=from-config"])
    opts = serve_options(cfg, resume="latest")
    assert (opts.host, opts.port, opts.snapshot_dir, opts.keep_snapshots) == ("127.0.0.1", 5570, tmp_path / "store", 5)
    assert (opts.snapshot_every_steps, opts.max_message_bytes, opts.resume) == (7, 2 * 2**20, "latest")
    assert opts.secret == b"from-config" and "from-config" not in repr(opts)
    assert serve_options(cfg, host="0.0.0.0", port=0).port == 0


def test_options_survive_serialisation_without_the_secret(tmp_path):
    opts = ServeOptions(host="::1", port=6000, shard=ShardSpec(1, 3), peers=("tcp://[::1]:5999", "tcp://[::1]:6000"),
                        snapshot_dir=tmp_path, keep_snapshots=4, timeout_s=9.0, snapshot_every_s=2.5,
                        resume="step-000000004", secret=b"s3cret", insecure=True, max_message_bytes=123)
    text = opts.to_json()
    assert "s3cret" not in text
    assert ServeOptions.from_json(text, b"s3cret") == opts
    assert ServeOptions.from_json(ServeOptions().to_json(), None) == ServeOptions()


def test_a_shard_process_runs_the_shard_worker_with_its_own_options(monkeypatch, tmp_path):
    started = []

    class FakePopen:
        def __init__(self, argv, env):
            started.append((argv, env))

    monkeypatch.setattr(launch_mod.subprocess, "Popen", FakePopen)
    monkeypatch.delenv(SECRET_ENV, raising=False)
    peers = ["tcp://127.0.0.1:7000", "tcp://127.0.0.1:7001"]
    start_shard(ServeOptions(port=7000, snapshot_dir=tmp_path, secret=b"s3cret"), 1, 2, peers)
    (argv, env), = started
    assert argv[:3] == [sys.executable, "-m", "hfs.paramserver.shard_worker"]
    assert "serve-params" not in argv and not any("s3cret" in a for a in argv)
    shard = ServeOptions.from_json(argv[3], env[SECRET_ENV].encode())
    assert (shard.port, shard.shard, shard.peers, shard.snapshot_dir) == (7001, ShardSpec(1, 2), tuple(peers), tmp_path)
    assert shard.secret == b"s3cret"


def test_a_shard_worker_error_is_one_line(monkeypatch, capsys):
    from hfs.paramserver import shard_worker
    from hfs.utils import log as log_mod

    monkeypatch.setattr(log_mod, "setup_logging", lambda verbose=0: None)  # leave pytest's logging alone
    monkeypatch.delenv(SECRET_ENV, raising=False)
    code = shard_worker.main([ServeOptions(host="0.0.0.0", port=1).to_json(), "0"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: refusing to listen on 0.0.0.0") and "\n" not in err
