"""Ctrl-C on `hfs train` (issue 15, item 3): the first stops cleanly after the step in progress
and says so at once; the second stops now and says what it did and what was kept."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

# slow-ish steps (~0.1-1 s on a busy CPU), so a signal lands in the middle of one
SLOW = ["train", "--set", "data.synthetic_classes=8", "--set", "data.synthetic_images_per_class=16",
        "--set", "data.image_size=64", "--set", "data.num_workers=0", "--set", "model.arch=tiny",
        "--set", "model.embedding_size=8", "--set", "train.batch_size=32", "--set", "train.grad_accum=4",
        "--set", "train.max_steps=10000", "--set", "train.log_every=1", "--set", "train.checkpoint_every=0"]


def start(out, *extra: str, session: bool = False) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "hfs", *SLOW, "--set", f"train.output_dir={out}", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=session)


def wait_for_steps(out, proc, count: int = 1, timeout: float = 120) -> None:
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= count:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("training did not start")


def read_until(stream, needle: str, timeout: float = 60) -> list[str]:
    lines, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = stream.readline()
        if not line:
            break
        lines.append(line)
        if needle in line:
            return lines
    raise AssertionError(f"{needle!r} not in {lines}")


@pytest.mark.slow
def test_first_ctrl_c_says_when_it_stops_and_checkpoints(tmp_path):
    out = tmp_path / "run"
    proc = start(out)
    try:
        wait_for_steps(out, proc)
        proc.send_signal(signal.SIGINT)
        said = read_until(proc.stderr, "stopping after step")[-1]
        assert "Ctrl-C again to stop now without a checkpoint" in said
        step = int(said.split("stopping after step ")[1].split()[0])
        _, rest = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, rest
    assert (out / "checkpoints" / f"step-{step:08d}.pt").is_file(), rest


@pytest.mark.slow
def test_second_ctrl_c_stops_now_and_says_what_was_kept(tmp_path):
    out = tmp_path / "run"
    proc = start(out, "--set", "train.checkpoint_every=2")
    try:
        wait_for_steps(out, proc, count=3)
        proc.send_signal(signal.SIGINT)
        read_until(proc.stderr, "stopping after step")
        proc.send_signal(signal.SIGINT)
        _, rest = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, rest
    assert "Traceback" not in rest, rest
    kept = sorted((out / "checkpoints").glob("step-*.pt"))
    assert kept, rest
    assert "stopped now without a checkpoint" in rest and str(kept[-1]) in rest, rest
    assert "--resume" in rest


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_to_the_process_group_with_loader_workers(tmp_path, signum):
    """Ctrl-C in a terminal (or scancel, or timeout) reaches the DataLoader workers too: one
    message, a clean stop, a checkpoint."""
    out = tmp_path / "run"
    # a long epoch, so the workers are still loading when the signal comes
    proc = start(out, "--set", "data.num_workers=2", "--set", "data.synthetic_images_per_class=200", session=True)
    try:
        wait_for_steps(out, proc, count=2)
        os.killpg(proc.pid, signum)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert err.count("stopping after step") == 1, err
    assert "Traceback" not in err and sorted((out / "checkpoints").glob("step-*.pt")), err
