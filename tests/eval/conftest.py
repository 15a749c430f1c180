"""Tiny verification sets and a tiny backbone for the eval tests (no downloads, CPU, milliseconds)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def make_pairs(num_pairs: int, size: int = 12, seed: int = 0) -> tuple[list[bytes], list[bool]]:
    """Same pairs show one image twice, different pairs two unrelated images."""
    rng = np.random.default_rng(seed)
    images, issame = [], []
    for i in range(num_pairs):
        same = i % 2 == 0
        a = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        b = a if same else rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        images += [png(a), png(b)]
        issame.append(same)
    return images, issame


class TinyNet:
    """Factory for a deterministic small conv net mapping 3x8x8 inputs to 16-D embeddings."""

    @staticmethod
    def build(seed: int = 0):
        import torch
        from torch import nn

        torch.manual_seed(seed)
        return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                             nn.Flatten(), nn.Linear(4 * 8 * 8, 16))


@pytest.fixture
def tiny_bin(tmp_path):
    from hfs.data.bins import write_bin

    images, issame = make_pairs(20)
    path = tmp_path / "tiny.bin"
    write_bin(path, images, issame)
    return path


@pytest.fixture
def tiny_model():
    return TinyNet.build()
