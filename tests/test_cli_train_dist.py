import json
import subprocess
import sys

import pytest
import torch

from hfs.train import checkpoint as ckpt_io


def _hfs(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hfs", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.dist
def test_train_dist_cli_trains_sharded_with_sampled_classes_on_two_ranks(tmp_path):
    out = tmp_path / "run"
    proc = _hfs("train-dist", "--nproc", "2", "--backend", "gloo", "--sharded", "--sample-num", "8",
                "--set", "data.source=synthetic", "--set", "data.synthetic_classes=16",
                "--set", "data.synthetic_images_per_class=8", "--set", "data.image_size=16",
                "--set", "data.num_workers=0", "--set", "model.arch=tiny", "--set", "model.embedding_size=16",
                "--set", "head.type=cosface", "--set", "head.scale=16", "--set", "train.batch_size=8",
                "--set", "train.max_steps=12", "--set", "train.log_every=4", "--set", f"train.output_dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "sharded: 8 of 16 classes per step" in proc.stdout
    ckpt = ckpt_io.load_checkpoint(ckpt_io.list_checkpoints(out)[-1])
    assert ckpt["world_size"] == 2 and ckpt["fc"]["weight"].shape == torch.Size([16, 16])
    losses = [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert len(losses) == 3 and losses[-1] < losses[0]


def test_train_dist_cli_refuses_two_classifier_modes():
    proc = _hfs("train-dist", "--sampled", "--sharded")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: --sampled and --sharded are two different classifier modes; pick one"]
