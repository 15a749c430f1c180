"""A tiny class-conditional image set and a small-CPU config for the training tests."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import TensorDataset

from hfs.config import load_config


def make_blobs(num_classes: int = 12, per_class: int = 16, size: int = 16, seed: int = 0) -> TensorDataset:
    """Each class is a fixed random pattern plus noise: learnable in a few dozen steps."""
    gen = torch.Generator().manual_seed(seed)
    templates = torch.rand(num_classes, 3, size, size, generator=gen) * 2 - 1
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    images = templates[labels] + 0.3 * torch.randn(len(labels), 3, size, size, generator=gen)
    return TensorDataset(images.clamp(-1, 1), labels)


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and lose a lot on a shared 2-core box."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def blobs():
    return make_blobs(), make_blobs(per_class=2, seed=0), 12


@pytest.fixture
def tiny_cfg(tmp_path):
    def build(*overrides: str):
        base = ["data.image_size=16", "data.num_workers=0", "model.arch=tiny", "model.embedding_size=16",
                "head.type=cosface", "head.scale=16", "head.margin=0.1", "optim.lr=0.1",
                "optim.schedule=cosine", "optim.warmup_steps=2", "train.batch_size=24", "train.max_steps=30",
                "train.log_every=5", "train.checkpoint_every=0", f"train.output_dir={tmp_path / 'run'}",
                "fc.init_std=0.1"]
        return load_config(None, base + list(overrides))

    return build
