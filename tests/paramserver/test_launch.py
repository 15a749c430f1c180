"""Supervising a group of shard processes (`hfs.paramserver.launch.supervise`): one dies, the others stop."""

from __future__ import annotations

import subprocess
import sys

from hfs.paramserver.launch import supervise


def test_a_child_that_fails_stops_the_others_and_its_code_is_returned():
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    children = [subprocess.Popen(sleeper), subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"]),
                subprocess.Popen(sleeper)]
    try:
        assert supervise(children) == 15  # the sleepers were terminated (SIGTERM), the worst code wins
        assert children[1].returncode == 3 and children[0].returncode == children[2].returncode == -15
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()


def test_children_that_all_succeed_give_zero():
    children = [subprocess.Popen([sys.executable, "-c", "pass"]) for _ in range(2)]
    assert supervise(children) == 0
