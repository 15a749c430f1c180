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


DECODERS = ("pil", "simplejpeg")
JPEG_MAGIC = b"\xff\xd8"


def resolve_decoder(name: str) -> str:
    """``data.decoder`` to a decoder that is installed: auto = simplejpeg when it imports, else PIL.

    Asking for simplejpeg explicitly without it installed is an error with the install hint,
    raised here, in the main process, before any DataLoader worker starts.
    """
    if name not in ("pil", "simplejpeg", "auto"):
        raise ValueError(f"unknown decoder {name!r}; one of pil, simplejpeg, auto")
    if name == "pil":
        return "pil"
    try:
        import simplejpeg  # noqa: F401
    except ImportError:
        if name == "auto":
            return "pil"
        from hfs.utils.errors import HfsError

        raise HfsError("config key 'data.decoder' is simplejpeg, which is not installed: "
                       "pip install simplejpeg (or data.decoder=pil)") from None
    return "simplejpeg"


def _decode_simplejpeg(data: bytes | str | Path) -> Image.Image | None:
    """libjpeg-turbo through simplejpeg for JPEG input; None for anything else (PIL decodes it)."""
    import simplejpeg

    raw = data if isinstance(data, (bytes, bytearray, memoryview)) else Path(data).read_bytes()
    if bytes(raw[:2]) != JPEG_MAGIC:
        return None
    try:
        return Image.fromarray(simplejpeg.decode_jpeg(raw, colorspace="RGB"))
    except ValueError:  # CMYK, arithmetic coding, ...: PIL's wider support decides
        return None


def decode_image(data: bytes | str | Path, decoder: str = "pil") -> Image.Image:
    """Decode encoded bytes (JPEG/PNG) or a file path into an RGB PIL image.

    ``decoder="simplejpeg"`` (resolved by :func:`resolve_decoder`) decodes JPEGs with
    simplejpeg; other formats, and JPEGs it cannot read, go through PIL.
    """
    if decoder == "simplejpeg":
        img = _decode_simplejpeg(data)
        if img is not None:
            return img
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
    """Decode (if needed, with ``decoder``: pil or simplejpeg), resize, normalise."""

    def __init__(self, image_size: int, decoder: str = "pil") -> None:
        self.image_size = image_size
        self.decoder = decoder

    def __call__(self, img):
        if not isinstance(img, Image.Image):
            img = decode_image(img, self.decoder)
        return to_tensor(resize(img, self.image_size))


class TrainTransform(EvalTransform):
    """EvalTransform plus a random horizontal flip drawn from the given numpy Generator."""

    def __init__(self, image_size: int, flip: bool = True, decoder: str = "pil") -> None:
        super().__init__(image_size, decoder)
        self.flip = flip

    def __call__(self, img, rng: np.random.Generator | None = None):
        if not isinstance(img, Image.Image):
            img = decode_image(img, self.decoder)
        rng = rng if rng is not None else np.random.default_rng()
        if self.flip and rng.random() < 0.5:
            img = hflip(img)
        return to_tensor(resize(img, self.image_size))
