"""The resume commands hfs prints work as printed (issue 15, item 11)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from hfs.config import load_config
from hfs.train.trainer import TrainResult
from hfs.utils.errors import HfsError


def test_interrupted_train_dist_worker_names_the_run_folder(monkeypatch, tmp_path):
    import hfs.dist as distributed
    import hfs.train.trainer as trainer
    from hfs.train.launch import train_worker

    class Stopped:
        def __init__(self, cfg, **kw):
            self.cfg = cfg

        def run(self):
            return TrainResult(steps=3, start_step=0, seconds=1.0, mode="full", num_classes=4, active_classes=4,
                               checkpoint=str(tmp_path / "run" / "checkpoints" / "step-00000003.pt"),
                               interrupted=True)

    monkeypatch.setattr(distributed, "init_distributed", lambda *a: distributed.DistEnv())
    monkeypatch.setattr(distributed, "destroy_distributed", lambda: None)
    monkeypatch.setattr(trainer, "Trainer", Stopped)
    cfg = load_config(None, [f"train.output_dir={tmp_path / 'run'}"])
    with pytest.raises(HfsError, match=rf"continue with `hfs train-dist --resume {tmp_path / 'run'}`"):
        train_worker(cfg.to_dict(), None, 0)


@pytest.mark.slow
def test_resume_latest_without_config_finds_the_newest_run(tmp_path):
    """`--resume latest` with no --config and nothing in runs/default resumes the newest run under runs/."""
    base = [sys.executable, "-m", "hfs", "train", "--set", "data.synthetic_classes=8",
            "--set", "data.synthetic_images_per_class=4", "--set", "data.image_size=16",
            "--set", "data.num_workers=0", "--set", "model.arch=tiny", "--set", "model.embedding_size=8",
            "--set", "train.batch_size=16"]
    first = subprocess.run([*base, "--set", "train.output_dir=runs/mine", "--set", "train.max_steps=1"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    again = subprocess.run([*base, "--set", "train.max_steps=2", "--resume", "latest"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "runs" / "mine" / "checkpoints" / "step-00000002.pt").is_file()
    assert not (tmp_path / "runs" / "default").exists()
    assert "runs/mine" in again.stderr
