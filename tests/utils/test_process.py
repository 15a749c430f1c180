"""hfs.utils.process: free ports, memory probes and a `hfs serve-params` child, one copy each."""

import socket
import subprocess
import sys

import numpy as np
import pytest

from hfs.utils.process import free_port, kill_if_running, memory_status_mb, peak_rss_mb, rss_mb, start_serve_params


def test_a_running_child_is_killed_and_reaped_a_finished_one_is_left_alone():
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    kill_if_running(sleeper)
    assert sleeper.returncode is not None and sleeper.returncode != 0
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait()
    kill_if_running(done)
    assert done.returncode == 0


def test_free_ports_can_be_bound_consecutively():
    base = free_port(count=3)
    socks = [socket.socket() for _ in range(3)]
    try:
        for i, sock in enumerate(socks):
            sock.bind(("127.0.0.1", base + i))
    finally:
        for sock in socks:
            sock.close()


def test_memory_probes_read_proc_and_see_an_allocation():
    status = memory_status_mb()
    assert status["VmHWM"] >= status["VmRSS"] > 0 and "RssAnon" in status
    before = rss_mb()
    block = np.ones(64 * 2**20 // 8)  # 64 MiB, touched
    assert rss_mb() - before > 48 and peak_rss_mb() >= rss_mb() - 1
    del block
    assert np.isnan(rss_mb("NoSuchLine")) and memory_status_mb(pid=2**30) == {}


def test_a_served_child_answers_at_its_address(tmp_path):
    pytest.importorskip("zmq")
    from hfs.paramserver.client import ParamClient

    server, address = start_serve_params(tmp_path / "snaps", shards=2)
    try:
        assert address.count("tcp://127.0.0.1:") == 2
        with ParamClient(address, timeout_s=30, connect_timeout_s=30) as client:
            assert [reply["num_shards"] for reply in client.ping()] == [2, 2]
            client.shutdown()
        server.wait(30)
    finally:
        kill_if_running(server)
