"""Embeddings for a list of images with any backbone: batched, optionally flip-augmented, AMP on CUDA.

The same code serves ``hfs extract`` (a checkpoint's backbone over a ``.bin`` or a file list,
saved as ``.npy`` + ``.json``), ``hfs verify --checkpoint`` and verification during training
(:func:`hfs.eval.evaluate.evaluate_bins`). Preprocessing is :class:`hfs.data.transforms.EvalTransform`,
the one used at training time, which resizes to the model's input when the stored size differs.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from hfs.utils.atomic import atomic_write, atomic_write_text
from hfs.utils.device import resolve_device
from hfs.utils.errors import HfsError

if TYPE_CHECKING:  # pragma: no cover
    import torch

log = logging.getLogger(__name__)


class EncodedImages:
    """A map-style dataset over encoded images (bytes) or image files, for a DataLoader.

    ``source`` names where the images came from, so a broken image is reported as
    ``lfw.bin: image 17 cannot be decoded (...)``.
    """

    def __init__(self, images: Sequence[bytes | str | Path], image_size: int, source: str) -> None:
        from hfs.data.transforms import EvalTransform

        self.images = images
        self.transform = EvalTransform(image_size)
        self.source = source

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        """``(CxHxW tensor, "")``, or ``(zeros, error message)`` for an image that cannot be decoded.

        Failures travel as data rather than exceptions so the DataLoader shuts its workers down
        normally and the message stays one line (worker exceptions come back with a traceback).
        """
        import torch

        item = self.images[index]
        try:
            return self.transform(item), ""
        except (OSError, ValueError, SyntaxError) as exc:
            where = f"image {index}" if isinstance(item, (bytes, bytearray)) else f"image {index} ({item})"
            size = self.transform.image_size
            return torch.zeros(3, size, size), f"{self.source}: {where} cannot be decoded ({_reason(exc)})"


def _reason(exc: Exception) -> str:
    from PIL import UnidentifiedImageError

    if isinstance(exc, UnidentifiedImageError):
        return "not a recognised image format"
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def list_image_paths(list_path: str | Path, prefix: str | Path) -> list[Path]:
    """The images of a ``relative/path label`` list (as ``hfs convert`` writes it), under ``prefix``."""
    from hfs.data.filelist import read_image_list

    rel_paths, _ = read_image_list(list_path)
    if not rel_paths:
        raise HfsError(f"image list {list_path} is empty")
    return [Path(prefix) / rel for rel in rel_paths]



def _model_device(model) -> "torch.device":
    import torch

    param = next(iter(model.parameters()), None)
    return param.device if param is not None else torch.device("cpu")


def _embed(model, x, flip: bool):
    """Embeddings of a batch, plus those of its mirror images when ``flip`` (InsightFace's flip test)."""
    import torch

    emb = model(x)
    if emb.ndim != 2:
        raise ValueError(f"the model returned shape {tuple(emb.shape)}; expected (batch, embedding)")
    emb = emb.float()
    if flip:
        emb = emb + model(torch.flip(x, dims=[3])).float()
    return emb


def extract_features(model, images: EncodedImages, *, batch_size: int = 256, flip: bool = False,
                     device: "str | torch.device | None" = None, num_workers: int = 0, amp: bool = True,
                     show_progress: bool = True, description: str = "extract") -> np.ndarray:
    """Run ``model`` over ``images`` in order and return float32 (N, D) embeddings.

    ``device`` defaults to where the model's parameters are. The model is put in eval mode
    for the pass and restored to its previous mode afterwards, so the trainer can call this
    mid-training. On CUDA the forward pass runs under fp16 autocast (``amp``).
    """
    chunks = list(iter_embeddings(model, images, batch_size=batch_size, flip=flip, device=device,
                                  num_workers=num_workers, amp=amp, show_progress=show_progress,
                                  description=description))
    if not chunks:
        raise HfsError(f"{images.source}: no images to extract")
    return np.concatenate(chunks).astype(np.float32, copy=False)


def iter_embeddings(model, images, *, batch_size: int = 256, flip: bool = False,
                    device: "str | torch.device | None" = None, num_workers: int = 0, amp: bool = True,
                    show_progress: bool = True, description: str = "extract"):
    """:func:`extract_features` one batch at a time: yields float32 (b, D) arrays in image order.

    For sets too large to hold every embedding at once (IJB-C: 469K images); ``images`` is any
    dataset whose items are ``(tensor, error message)`` as :class:`EncodedImages` returns them.
    A failed image raises :class:`HfsError` with its message once the loader has shut down.
    """
    import contextlib

    import torch
    from torch.utils.data import DataLoader

    device = _model_device(model) if device is None else resolve_device(device, "--device")
    loader = DataLoader(images, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        pin_memory=device.type == "cuda")
    autocast = (torch.autocast("cuda", dtype=torch.float16) if amp and device.type == "cuda"
                else contextlib.nullcontext())
    was_training = model.training
    model.eval()
    bar = _progress_bar(show_progress)
    failure = ""
    try:
        with bar:
            task = bar.add_task(description, total=len(images), info="flip" if flip else "") if bar else None
            for batch, errors in loader:
                failure = next((e for e in errors if e), "")
                if failure:
                    break
                with torch.inference_mode(), autocast:
                    emb = _embed(model, batch.to(device, non_blocking=True), flip).cpu().numpy()
                yield emb.astype(np.float32, copy=False)
                if bar:
                    bar.advance(task, len(batch))
    finally:
        model.train(was_training)
    if failure:
        raise HfsError(failure)


def _progress_bar(show: bool):
    """The shared rich progress bar, or a no-op context (falsy) when hidden."""
    if show:
        from hfs.utils.log import progress

        return progress()
    return _NoBar()


class _NoBar:
    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None

    def __bool__(self) -> bool:
        return False


def features_meta_path(out: str | Path) -> Path:
    """``feats.npy`` -> ``feats.json`` (the description written beside the features)."""
    return Path(out).with_suffix(".json")


def write_features(out: str | Path, features: np.ndarray, meta: dict[str, Any]) -> Path:
    """Write float32 features as ``.npy`` and a JSON description beside it, both atomically."""
    out = Path(out)
    if out.suffix != ".npy":
        raise HfsError(f"--out {out}: features are written as .npy; give a path ending in .npy")
    features = np.ascontiguousarray(features, dtype=np.float32)
    with atomic_write(out, "wb") as fh:
        np.save(fh, features, allow_pickle=False)
    info = {**meta, "count": int(features.shape[0]), "dim": int(features.shape[1]), "dtype": "float32"}
    meta_path = features_meta_path(out)
    atomic_write_text(meta_path, json.dumps(info, indent=2, sort_keys=True) + "\n")
    log.info("wrote %d x %d features to %s (+ %s)", features.shape[0], features.shape[1], out, meta_path.name)
    return meta_path


def read_features(path: str | Path) -> np.ndarray:
    """Load an (N, D) feature matrix written by ``hfs extract`` (or any 2-D float .npy)."""
    path = Path(path)
    try:
        arr = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise HfsError(f"features file {path} does not exist") from None
    except (OSError, ValueError, EOFError) as exc:
        raise HfsError(f"{path}: not a readable .npy feature file ({str(exc).splitlines()[0]})") from None
    if not isinstance(arr, np.ndarray) or arr.ndim != 2 or not np.issubdtype(arr.dtype, np.floating):
        raise HfsError(f"{path}: expected a 2-D float array of features, got {getattr(arr, 'dtype', '?')} "
                       f"{getattr(arr, 'shape', '?')}")
    if not np.isfinite(arr).all():
        raise HfsError(f"{path}: features contain NaN or infinity")
    return arr
