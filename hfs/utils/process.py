"""Child processes the benchmarks start (a `serve-params` server, a seed-style server)."""

from __future__ import annotations

import subprocess


def kill_if_running(proc: subprocess.Popen) -> None:
    """Kill and reap ``proc`` if it has not exited: the cleanup after an orderly stop that failed,
    so no benchmark leaves a server (and its gigabytes) behind."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()
