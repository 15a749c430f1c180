"""`hfs serve-params` as real processes: kill -9 mid-snapshot, --resume, SIGTERM, --shards."""

from __future__ import annotations

import os
import signal
import threading

import numpy as np
import pytest

from hfs.paramserver.base import HParams
from hfs.paramserver.client import ParamClient
from hfs.paramserver.snapshots import PAUSE_ENV, list_snapshots


def _client(port: int, **kw) -> ParamClient:
    return ParamClient(f"tcp://127.0.0.1:{port}", timeout_s=30, connect_timeout_s=30, **kw)


@pytest.mark.slow
def test_kill_during_snapshot_then_resume_latest(processes, helpers, tmp_path):
    snaps = tmp_path / "snaps"
    port = helpers.free_port()
    # The test hook pauses every snapshot after its first array, so the kill lands inside one.
    server = processes("serve-params", "--port", str(port), "--snapshot-dir", str(snaps), env={PAUSE_ENV: "1.5"})
    with _client(port) as client:
        client.create("fc", 64, 8, seed=4)
        client.set_hparams("fc", HParams(0.1, 0.9, 0.0))
        client.push_grads("fc", np.arange(64), np.ones((64, 8), np.float32), 0)
        assert client.snapshot() == "step-000000001"
        kept = client.get_rows("fc", np.arange(64))
        client.push_grads("fc", np.arange(64), np.ones((64, 8), np.float32), 1)
        threading.Thread(target=lambda: _snapshot_ignoring_errors(client), daemon=True).start()
        helpers.wait_for(lambda: any(p.name.endswith(".tmp") and any(p.iterdir()) for p in snaps.iterdir()),
                         what="a half-written snapshot")
        os.kill(server.pid, signal.SIGKILL)
        server.wait(10)
    assert [name for _, _, name in list_snapshots(snaps)] == ["step-000000001"]

    server = processes("serve-params", "--port", str(port), "--snapshot-dir", str(snaps), "--resume", "latest")
    with _client(port) as client:
        np.testing.assert_array_equal(client.get_rows("fc", np.arange(64)), kept)
        assert client.ping()[0]["matrices"]["fc"]["last_applied"] == 0
        client.push_grads("fc", np.arange(64), np.ones((64, 8), np.float32), 1)  # step 1 again: it was lost
    assert not [p for p in snaps.iterdir() if p.name.startswith(".")]  # the torn temp folder is gone
    server.send_signal(signal.SIGTERM)
    output = server.communicate(timeout=30)[0]
    assert server.returncode == 0, output
    assert [name for _, _, name in list_snapshots(snaps)] == ["step-000000001", "step-000000002"]  # final snapshot


def _snapshot_ignoring_errors(client: ParamClient) -> None:
    try:
        client.snapshot()
    except Exception:
        pass  # the server is killed under it


def test_two_shard_group_from_the_cli(processes, helpers, tmp_path):
    port = helpers.free_port(count=2)
    group = processes("serve-params", "--shards", "2", "--port", str(port), "--snapshot-dir", str(tmp_path))
    with _client(port) as client:  # one endpoint; the other shard is discovered
        assert client.endpoints == [f"tcp://127.0.0.1:{port}", f"tcp://127.0.0.1:{port + 1}"]
        client.create("fc", 10, 3, init="zeros")
        client.set_hparams("fc", HParams(1.0, 0.0, 0.0))
        client.push_grads("fc", np.array([0, 9, 9]), np.ones((3, 3), np.float32), 0)
        got = client.get_rows("fc", np.array([9, 0, 5]), step=1)
        np.testing.assert_array_equal(got, [[-2.0] * 3, [-1.0] * 3, [0.0] * 3])
        client.shutdown()
    output = group.communicate(timeout=30)[0]
    assert group.returncode == 0, output
    for i in range(2):
        assert [n for _, _, n in list_snapshots(tmp_path / f"shard-{i}-of-2")] == ["step-000000001"]
    # issue 15 item 16: every line a shard logs says which shard wrote it
    serving = [line for line in output.splitlines() if "serving on" in line]
    assert len(serving) == 2 and all(any(f"[shard {i}/2] " in line for i in range(2)) for line in serving), output
    assert {line.split("[shard ")[1][:3] for line in serving} == {"0/2", "1/2"}


def test_resume_latest_without_a_snapshot_is_an_error(processes, helpers, tmp_path):
    """Issue 15 item 16: `--resume latest` with nothing to resume does not start empty; latest-or-new does."""
    port = helpers.free_port()
    server = processes("serve-params", "--port", str(port), "--snapshot-dir", str(tmp_path), "--resume", "latest")
    output = server.communicate(timeout=60)[0]
    assert server.returncode == 2, output
    assert output.strip().splitlines()[-1] == (f"error: --resume latest: no snapshot in {tmp_path}; "
                                               "use --resume latest-or-new to start empty when there is none")
    server = processes("serve-params", "--port", str(port), "--snapshot-dir", str(tmp_path),
                       "--resume", "latest-or-new")
    with _client(port) as client:
        assert client.ping()[0]["matrices"] == {}
    server.send_signal(signal.SIGTERM)
    assert server.wait(30) == 0


@pytest.mark.slow
def test_two_shard_processes_over_shared_memory_give_the_store_numbers_bit_for_bit(processes, helpers, tmp_path):
    """Real processes, so the client runs while a shard finishes a get after its reply: pipelined
    pushes of varying sizes through the segment overwrite the request region the get's rows came
    in; the numbers must still be the in-process store's (a shared buffer once crashed a shard)."""
    from hfs.paramserver.store import InProcessStore

    port = helpers.free_port(count=2)
    group = processes("serve-params", "--shards", "2", "--port", str(port), "--snapshot-dir", str(tmp_path))
    local = InProcessStore()
    rng = np.random.default_rng(5)
    with ParamClient(f"tcp://127.0.0.1:{port}", timeout_s=10, connect_timeout_s=30, shared_memory="auto",
                     pipeline_pushes=True) as client:
        for store in (client, local):
            store.create("fc", 50_000, 256, init="gaussian", std=0.1, seed=1, update_rule="catchup")
            store.set_hparams("fc", HParams(0.1, 0.9, 1e-3))
        for step in range(60):
            rows = rng.choice(50_000, int(rng.integers(100, 1500)), replace=False)
            grads = rng.standard_normal((rows.size, 256)).astype(np.float32)
            got = client.get_rows("fc", rows, step=step)
            client.push_grads("fc", rows, grads, step)  # at once: into the region while the shard writes back
            np.testing.assert_array_equal(got, local.get_rows("fc", rows, step=step), err_msg=f"step {step}")
            local.push_grads("fc", rows, grads, step)
        every = np.arange(0, 50_000, 7)
        np.testing.assert_array_equal(client.get_rows("fc", every, step=60), local.get_rows("fc", every, step=60))
        assert all(s["server"]["shm_bytes_in"] > 0 for s in client.server_stats())
        client.shutdown()
    output = group.communicate(timeout=30)[0]
    assert group.returncode == 0, output
