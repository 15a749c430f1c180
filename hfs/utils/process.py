"""Processes the launcher, the benchmarks and the tests start and watch: free ports, memory probes,
a `hfs serve-params` child.

One copy of each, so a benchmark's "peak RSS" and a test's "RSS grew by" read the same /proc
line, and every started server is the same command.
"""

from __future__ import annotations

import os
import resource
import socket
import subprocess
import sys
from pathlib import Path
from typing import IO, Any, Sequence


def free_port(host: str = "127.0.0.1", count: int = 1) -> int:
    """A port free on ``host`` right now; with ``count``, the first of that many consecutive free
    ports (a sharded server listens on port .. port + count - 1)."""
    for _ in range(200):
        with socket.socket() as sock:
            sock.bind((host, 0))
            base = sock.getsockname()[1]
        if count == 1 or _all_free(host, base, count):
            return base
    raise OSError(f"no {count} consecutive free ports on {host}")


def _all_free(host: str, base: int, count: int) -> bool:
    if base + count > 65536:
        return False
    socks = []
    try:
        for port in range(base, base + count):
            socks.append(socket.socket())
            socks[-1].bind((host, port))
        return True
    except OSError:
        return False
    finally:
        for sock in socks:
            sock.close()


def kill_if_running(proc: subprocess.Popen) -> None:
    """Kill and reap ``proc`` if it has not exited: the cleanup after an orderly stop that failed,
    so no benchmark leaves a server (and its gigabytes) behind."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()


# --------------------------------------------------------------------------- memory


def peak_rss_mb() -> float:
    """This process's peak resident set size so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def memory_status_mb(pid: int | str = "self") -> dict[str, float]:
    """The memory lines of /proc/PID/status in MiB: ``VmRSS`` (resident now), ``VmHWM`` (its peak),
    ``RssAnon`` / ``RssFile`` / ``RssShmem`` (resident anonymous / file-backed / shared); empty
    where there is no /proc."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return {}
    return {key: int(value.split()[0]) / 1024.0 for key, value in
            (line.split(":", 1) for line in lines if line.startswith(("Vm", "Rss")))}


def rss_mb(field: str = "VmRSS", pid: int | str = "self") -> float:
    """One line of :func:`memory_status_mb` (NaN when it is not there)."""
    return memory_status_mb(pid).get(field, float("nan"))


# --------------------------------------------------------------------------- serve-params


def served_address(port: int, shards: int = 1, host: str = "127.0.0.1") -> str:
    """The ``paramserver.address`` of a server whose shard i listens on ``port + i``."""
    return ",".join(f"tcp://{host}:{port + i}" for i in range(shards))


def start_serve_params(snapshot_dir: str | Path | None = None, *, shards: int = 1, port: int | None = None,
                       args: Sequence[str] = (), env: dict[str, str] | None = None,
                       stdout: IO[Any] | int | None = subprocess.DEVNULL,
                       stderr: IO[Any] | int | None = subprocess.DEVNULL,
                       cwd: str | Path | None = None) -> tuple[subprocess.Popen, str]:
    """`hfs serve-params` on 127.0.0.1 as a child process of this Python, and its address.

    ``port`` None: free ports (``shards`` consecutive ones); ``args``: more flags (e.g.
    ``--set``); ``env`` is laid over this process's environment. Stop it with SIGTERM (a final
    snapshot) or the ``shutdown`` op, then :func:`kill_if_running`.
    """
    port = free_port(count=shards) if port is None else port
    cmd = [sys.executable, "-m", "hfs", "serve-params", "--port", str(port), "--shards", str(shards)]
    if snapshot_dir is not None:
        cmd += ["--snapshot-dir", str(snapshot_dir)]
    proc = subprocess.Popen([*cmd, *args], env={**os.environ, **(env or {})}, stdout=stdout, stderr=stderr, cwd=cwd)
    return proc, served_address(port, shards)
