"""Long phases show progress (issue 15, item 7): every phase of make-synthetic, bench-fc and
bench-sampler that can take more than a few seconds at default sizes has its own bar.

The commands run with TTY_COMPATIBLE=1 so rich draws the bars into the captured stderr.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def hfs(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, TTY_COMPATIBLE="1", COLUMNS="200")
    proc = subprocess.run([sys.executable, "-m", "hfs", *args], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    return proc


def test_make_synthetic_val_pairs_and_val_bin_have_bars(tmp_path):
    err = hfs("make-synthetic", "--out", str(tmp_path / "s"), "--num-classes", "4", "--images-per-class", "2",
              "--image-size", "16", "--val-pairs", "20").stderr
    for phase in ("generating", "val pairs", "writing val.bin"):
        assert phase in err, err


@pytest.mark.slow
def test_bench_fc_has_bars(tmp_path):
    err = hfs("bench-fc", "--num-classes", "64", "--dim", "4", "--batch-size", "4", "--sample-num", "8",
              "--steps", "2", "--full-steps", "1", "--set", "sampler.type=random").stderr
    for phase in ("index build", "sampled steps", "full steps"):
        assert phase in err, err


@pytest.mark.slow
@pytest.mark.parametrize("weights", ["generated"])
def test_bench_sampler_weight_generation_has_a_bar(weights):
    err = hfs("bench-sampler", "--num-classes", "100", "--dim", "4", "--batch-size", "4", "--sample-num", "10",
              "--samplers", "random", "--batches", "1").stderr
    for phase in ("generating weights", "writing weights", "exact reference"):
        assert phase in err, err
