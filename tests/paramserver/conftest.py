"""Servers for the parameter-server tests: in a thread (fast) or as `hfs serve-params` processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from hfs.paramserver.server import ParamServer
from hfs.paramserver.sharding import ShardSpec
from hfs.paramserver.store import InProcessStore
from hfs.utils.process import free_port

REPO = Path(__file__).resolve().parents[2]


class ThreadServer:
    """A ParamServer running in a daemon thread; stop() joins it."""

    def __init__(self, store: InProcessStore, endpoint: str = "tcp://127.0.0.1:0", **kw) -> None:
        self.server = ParamServer(store, endpoint, **kw)
        self.endpoint = self.server.endpoint
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.stop()
        self.thread.join(10)
        self.server.close()


@pytest.fixture
def thread_server():
    started: list[ThreadServer] = []

    def start(store: InProcessStore | None = None, **kw) -> ThreadServer:
        srv = ThreadServer(store or InProcessStore(timeout_s=10), **kw)
        started.append(srv)
        return srv

    yield start
    for srv in started:
        srv.stop()


@pytest.fixture
def shard_pair(tmp_path):
    """Two in-thread shards of one group, each listing both endpoints as peers."""
    base = free_port(count=2)
    peers = [f"tcp://127.0.0.1:{base + i}" for i in range(2)]
    servers = [ThreadServer(InProcessStore(tmp_path / f"shard-{i}", timeout_s=10, shard=ShardSpec(i, 2)),
                            peers[i], peers=peers) for i in range(2)]
    yield servers
    for srv in servers:
        srv.stop()


def hfs_process(*args: str, env: dict | None = None) -> subprocess.Popen:
    """`python -m hfs ...` from this worktree, output captured."""
    full_env = dict(os.environ, PYTHONPATH=str(REPO), **(env or {}))
    return subprocess.Popen([sys.executable, "-m", "hfs", *args], env=full_env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture
def processes():
    """Start `hfs` processes; any still running at the end get SIGKILL."""
    started: list[subprocess.Popen] = []

    def start(*args: str, env: dict | None = None) -> subprocess.Popen:
        proc = hfs_process(*args, env=env)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)


def wait_for(predicate, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def helpers():
    """free_port and wait_for for test modules (importlib mode cannot import conftest)."""
    return type("Helpers", (), {"free_port": staticmethod(free_port), "wait_for": staticmethod(wait_for)})
