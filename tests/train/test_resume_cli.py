"""`hfs train --resume` from the command line (issue 15, items 2 and 4)."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

BASE = [sys.executable, "-m", "hfs", "train", "--set", "data.synthetic_classes=8",
        "--set", "data.synthetic_images_per_class=4", "--set", "data.synthetic_val_per_class=1",
        "--set", "data.image_size=16", "--set", "data.num_workers=0", "--set", "model.arch=tiny",
        "--set", "model.embedding_size=8", "--set", "train.batch_size=16"]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*BASE, *args], capture_output=True, text=True, timeout=300)


def steps_in(run_dir) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").glob("step-*.pt"))


@pytest.mark.slow
def test_resume_from_a_copy_writes_into_the_copy(tmp_path):
    """Item 2: the original run keeps its checkpoints; the copy gets the new ones, and the command says so."""
    original, copy = tmp_path / "original", tmp_path / "copy"
    first = run("--set", f"train.output_dir={original}", "--set", "train.max_steps=2",
                "--set", "train.checkpoint_every=1", "--set", "train.keep_checkpoints=2")
    assert first.returncode == 0, first.stderr
    shutil.copytree(original, copy)
    before = steps_in(original)
    resumed = run("--set", "train.max_steps=3", "--set", "train.keep_checkpoints=1", "--resume", str(copy))
    assert resumed.returncode == 0, resumed.stderr
    assert steps_in(original) == before == ["step-00000001.pt", "step-00000002.pt"]
    assert steps_in(copy) == ["step-00000003.pt"]
    assert str(copy) in resumed.stderr + resumed.stdout


@pytest.mark.slow
def test_resume_with_an_explicit_output_dir_writes_there(tmp_path):
    original, elsewhere = tmp_path / "original", tmp_path / "elsewhere"
    assert run("--set", f"train.output_dir={original}", "--set", "train.max_steps=1").returncode == 0
    resumed = run("--set", "train.max_steps=2", "--set", f"train.output_dir={elsewhere}", "--resume", str(original))
    assert resumed.returncode == 0, resumed.stderr
    assert steps_in(original) == ["step-00000001.pt"] and steps_in(elsewhere) == ["step-00000002.pt"]


@pytest.mark.slow
def test_resume_of_a_finished_run_touches_nothing(tmp_path):
    """Item 4: says the run is complete, exits 0, and leaves checkpoint and metrics as they were."""
    out = tmp_path / "run"
    assert run("--set", f"train.output_dir={out}", "--set", "train.max_steps=2").returncode == 0
    ckpt = out / "checkpoints" / "step-00000002.pt"
    metrics = (out / "metrics.jsonl").read_text()
    stamp = ckpt.stat().st_mtime_ns
    again = run("--set", f"train.output_dir={out}", "--resume", "latest")
    assert again.returncode == 0, again.stderr
    assert "complete" in again.stdout + again.stderr
    assert ckpt.stat().st_mtime_ns == stamp and (out / "metrics.jsonl").read_text() == metrics
    assert steps_in(out) == ["step-00000002.pt"]
