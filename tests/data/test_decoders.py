"""data.decoder: simplejpeg gives PIL's pixels (within JPEG-decoder tolerance); PIL stays the fallback."""

import io
import sys

import numpy as np
import pytest
from PIL import Image

from hfs.data.transforms import EvalTransform, TrainTransform, decode_image, resolve_decoder
from hfs.utils.errors import HfsError

# Two conforming JPEG decoders may differ by rounding in the inverse DCT and the chroma
# upsampling; libjpeg-turbo in both PIL and simplejpeg agrees exactly, others within a few levels.
TOLERANCE = 2


def _face_like(seed: int, size: int = 112) -> Image.Image:
    """Smooth colour structure plus noise: what a face crop looks like to a JPEG coder."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (14, 14, 3), dtype=np.uint8)).resize((size, size), Image.BICUBIC)
    noisy = np.asarray(coarse, dtype=np.int16) + rng.integers(-20, 21, (size, size, 3))
    return Image.fromarray(noisy.clip(0, 255).astype(np.uint8))


def _encode(img: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("subsampling", [0, 2])  # 4:4:4 and 4:2:0
def test_simplejpeg_and_pil_decode_the_same_pixels(subsampling):
    pytest.importorskip("simplejpeg")
    for seed in range(3):
        data = _encode(_face_like(seed), quality=90, subsampling=subsampling)
        pil = np.asarray(decode_image(data, "pil"), dtype=np.int16)
        fast = np.asarray(decode_image(data, "simplejpeg"), dtype=np.int16)
        assert fast.shape == pil.shape == (112, 112, 3)
        assert np.abs(fast - pil).max() <= TOLERANCE


def test_simplejpeg_decoder_reads_paths_grey_and_png_through_the_fallback(tmp_path):
    pytest.importorskip("simplejpeg")
    grey = Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 20), dtype=np.uint8))
    (tmp_path / "g.jpg").write_bytes(_encode(grey))
    out = decode_image(tmp_path / "g.jpg", "simplejpeg")
    assert out.mode == "RGB" and out.size == (20, 20)
    assert np.abs(np.asarray(out, np.int16) - np.asarray(decode_image(tmp_path / "g.jpg"), np.int16)).max() <= TOLERANCE
    png = _encode(_face_like(1, 16), "PNG")
    assert np.array_equal(np.asarray(decode_image(png, "simplejpeg")), np.asarray(_face_like(1, 16)))


def test_transforms_with_either_decoder_agree():
    pytest.importorskip("simplejpeg")
    data = _encode(_face_like(2), quality=95)
    a, b = EvalTransform(112, "pil")(data), EvalTransform(112, "simplejpeg")(data)
    assert (a - b).abs().max().item() <= TOLERANCE / 127.5 + 1e-6
    rng = np.random.default_rng
    assert TrainTransform(112, True, "simplejpeg")(data, rng(0)).shape == (3, 112, 112)
    flipped_fast = TrainTransform(112, True, "simplejpeg")(data, rng(5))
    flipped_pil = TrainTransform(112, True)(data, rng(5))
    assert (flipped_fast - flipped_pil).abs().max() <= TOLERANCE / 127.5 + 1e-6


def test_resolve_decoder_falls_back_to_pil_or_names_the_key(monkeypatch):
    assert resolve_decoder("pil") == "pil"
    monkeypatch.setitem(sys.modules, "simplejpeg", None)  # import fails as if not installed
    assert resolve_decoder("auto") == "pil"
    with pytest.raises(HfsError, match=r"'data.decoder' is simplejpeg.*pip install simplejpeg"):
        resolve_decoder("simplejpeg")


def test_auto_picks_simplejpeg_when_installed():
    pytest.importorskip("simplejpeg")
    assert resolve_decoder("auto") == "simplejpeg"
