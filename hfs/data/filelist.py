"""Image lists ("relative/path label" per line), the per-identity validation split, image sniffing.

`hfs convert` writes the lists, the file-list dataset and ``convert --to rec`` read them, and
convert and the .rec dataset share one split rule, so a .rec read directly and its converted
tree hold out the same images for the same seed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from hfs.utils.atomic import atomic_write_text
from hfs.utils.errors import HfsError

_SIGNATURES: tuple[tuple[bytes, int, str], ...] = (
    (b"\xff\xd8\xff", 0, "jpg"), (b"\x89PNG\r\n\x1a\n", 0, "png"), (b"BM", 0, "bmp"),
    (b"GIF87a", 0, "gif"), (b"GIF89a", 0, "gif"), (b"WEBP", 8, "webp"),
)
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp"})


def image_extension(data: bytes | memoryview) -> str | None:
    """The file extension of an encoded image from its magic bytes (not from any name), or None."""
    head = bytes(data[:16])
    for magic, offset, ext in _SIGNATURES:
        if head[offset:offset + len(magic)] == magic:
            if ext == "webp" and head[:4] != b"RIFF":
                continue
            return ext
    return None


def read_image_list(path: str | Path) -> tuple[list[str], np.ndarray]:
    """(relative paths, int64 labels) of a list file; a malformed line is an error naming its number."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise HfsError(f"cannot read image list {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise HfsError(f"image list {path} is not UTF-8 text (byte {exc.start})") from None
    paths: list[str] = []
    labels: list[int] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.rstrip().rsplit(None, 1)
        if len(parts) != 2 or not parts[1].isdigit():
            raise HfsError(f"{path} line {lineno}: expected 'relative/path label' with a non-negative integer "
                           f"label, got {line[:80]!r}")
        paths.append(parts[0])
        labels.append(int(parts[1]))
    return paths, np.asarray(labels, dtype=np.int64)


def write_image_list(path: str | Path, paths: Sequence[str], labels: Iterable[int]) -> None:
    atomic_write_text(path, "".join(f"{p} {int(label)}\n" for p, label in zip(paths, labels)))


def split_per_identity(labels: np.ndarray, val_ratio: float, seed: int) -> np.ndarray:
    """Boolean mask of validation items: ``round(n * val_ratio)`` of each identity's n images.

    Every identity keeps at least one training image. Which images are held out depends only on
    ``seed`` and the order of ``labels``, so the split is reproducible.
    """
    labels = np.asarray(labels, dtype=np.int64)
    if not 0.0 <= val_ratio < 1.0:
        raise HfsError(f"val ratio must be in [0, 1), got {val_ratio}")
    if len(labels) == 0 or val_ratio == 0.0:
        return np.zeros(len(labels), dtype=bool)
    counts = np.bincount(labels)
    n_val = np.clip(np.minimum(np.floor(counts * val_ratio + 0.5), counts - 1), 0, None).astype(np.int64)
    draw = np.random.default_rng(seed).random(len(labels))
    order = np.lexsort((draw, labels))
    sorted_labels = labels[order]
    group_start = np.searchsorted(sorted_labels, sorted_labels, side="left")
    rank = np.arange(len(labels)) - group_start
    mask = np.zeros(len(labels), dtype=bool)
    mask[order] = rank < n_val[sorted_labels]
    return mask
