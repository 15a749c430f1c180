"""Numeric flags are range-checked by the same rule as their config key (issue 15, item 9)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from hfs.config import ConfigError, check_flag, load_config


def hfs(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hfs", *args], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("args, message", [
    (["serve-params", "--port", "70000"], "error: --port must be <= 65535; got 70000"),
    (["serve-params", "--port", "-1"], "error: --port must be > 0; got -1"),
    (["serve-params", "--shards", "0"], "error: --shards must be > 0; got 0"),
    (["serve-params", "--port", "65535", "--shards", "2"],
     "error: --port 65535 + --shards 2: shard 1 would listen on port 65536, above 65535"),
    (["train", "--sample-num", "0"], "error: --sample-num must be > 0; got 0"),
    (["train-dist", "--master-port", "70000"], "error: --master-port must be <= 65535; got 70000"),
    (["verify", "--folds", "1"], "error: --folds must be >= 2; got 1"),
])
def test_out_of_range_flag_is_one_line(args, message):
    proc = hfs(*args)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [message]


def test_flag_and_key_share_one_rule():
    with pytest.raises(ConfigError, match=r"^config key 'paramserver.port' must be <= 65535; got 70000$"):
        load_config(None, ["paramserver.port=70000"])
    with pytest.raises(ConfigError, match=r"^--port must be <= 65535; got 70000$"):
        check_flag("--port", "paramserver.port", 70000)
    check_flag("--port", "paramserver.port", 65535)
