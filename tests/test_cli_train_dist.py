import json
import subprocess
import sys

import pytest
import torch

from hfs import checkpoint as ckpt_io
from hfs.utils.process import free_port


def _hfs(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hfs", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.dist
def test_train_dist_cli_two_nodes_sharded_with_sampled_classes(tmp_path):
    """The training guide's multi-node recipe, both "nodes" on this machine: 2 launchers x 1 worker."""
    out, port = tmp_path / "run", free_port()
    common = ["train-dist", "--nnodes", "2", "--master-addr", "127.0.0.1", "--master-port", str(port),
              "--nproc", "1", "--backend", "gloo", "--sharded", "--sample-num", "8",
              "--set", "data.source=synthetic", "--set", "data.synthetic_classes=16",
              "--set", "data.synthetic_images_per_class=8", "--set", "data.image_size=16",
              "--set", "data.num_workers=0", "--set", "model.arch=tiny", "--set", "model.embedding_size=16",
              "--set", "head.type=cosface", "--set", "head.scale=16", "--set", "train.batch_size=8",
              "--set", "train.max_steps=12", "--set", "train.log_every=4", "--set", f"train.output_dir={out}"]
    nodes = [subprocess.Popen([sys.executable, "-m", "hfs", *common, "--node-rank", str(rank)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    (out0, err0), (_, err1) = (node.communicate(timeout=300) for node in nodes)
    assert [node.returncode for node in nodes] == [0, 0], (err0[-2000:], err1[-2000:])
    assert "sharded: 8 of 16 classes per step" in out0
    ckpt = ckpt_io.load_checkpoint(ckpt_io.list_checkpoints(out)[-1])
    assert ckpt["world_size"] == 2 and ckpt["fc"]["weight"].shape == torch.Size([16, 16])
    losses = [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert len(losses) == 3 and losses[-1] < losses[0]


def test_train_dist_cli_refuses_two_classifier_modes():
    proc = _hfs("train-dist", "--sampled", "--sharded")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: --sampled and --sharded are two different classifier modes; pick one"]
