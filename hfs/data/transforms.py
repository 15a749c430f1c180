"""Image transforms in plain PIL/torch (no torchvision): decode, resize, flip, normalise.

Every path that turns an image into a model input (training, validation, extraction,
verification) uses these, so train-time and eval-time preprocessing cannot drift apart.
Inputs are normalised to [-1, 1] ((x / 255 - 0.5) / 0.5), as InsightFace models expect.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image


def decode_image(data: bytes | str | Path) -> Image.Image:
    """Decode encoded bytes (JPEG/PNG) or a file path into an RGB PIL image."""
    src = io.BytesIO(data) if isinstance(data, (bytes, bytearray, memoryview)) else data
    with Image.open(src) as img:
        return img.convert("RGB")


def resize(img: Image.Image, size: int) -> Image.Image:
    """Square resize with bilinear filtering; a no-op when the size already matches."""
    if img.size == (size, size):
        return img
    return img.resize((size, size), Image.BILINEAR)


def to_tensor(img: Image.Image):
    """HWC uint8 RGB -> CHW float32 in [-1, 1]."""
    import torch

    arr = np.asarray(img, dtype=np.uint8)
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    t = torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))).float()
    return t.div_(127.5).sub_(1.0)


def hflip(img: Image.Image) -> Image.Image:
    return img.transpose(Image.FLIP_LEFT_RIGHT)


class EvalTransform:
    """Decode (if needed), resize, normalise."""

    def __init__(self, image_size: int) -> None:
        self.image_size = image_size

    def __call__(self, img):
        if not isinstance(img, Image.Image):
            img = decode_image(img)
        return to_tensor(resize(img, self.image_size))


class TrainTransform(EvalTransform):
    """EvalTransform plus a random horizontal flip drawn from the given numpy Generator."""

    def __init__(self, image_size: int, flip: bool = True) -> None:
        super().__init__(image_size)
        self.flip = flip

    def __call__(self, img, rng: np.random.Generator | None = None):
        if not isinstance(img, Image.Image):
            img = decode_image(img)
        rng = rng if rng is not None else np.random.default_rng()
        if self.flip and rng.random() < 0.5:
            img = hflip(img)
        return to_tensor(resize(img, self.image_size))
