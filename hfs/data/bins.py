"""InsightFace verification ``.bin`` files (lfw.bin, cfp_fp.bin, agedb_30.bin).

A ``.bin`` is a pickle of ``(images, issame)``: ``2N`` images, where images ``2i`` and
``2i + 1`` form pair ``i``, and ``N`` booleans saying whether each pair shows one person.
Three encodings circulate and all of them load:

* Python 2 pickles, whose images are ``str`` objects. They are read with
  ``encoding='latin1'`` (what NumPy needs for Python 2 arrays) and every ``str`` is turned
  back into the identical bytes with ``str.encode('latin1')`` -- a byte-exact round trip,
  equivalent to ``encoding='bytes'`` for the images.
* Python 3 pickles of ``bytes`` (any protocol).
* NumPy ``uint8`` arrays: 1-D arrays holding the encoded JPEG/PNG buffer are returned as
  those bytes unchanged; decoded images (``HxWx3``, ``HxWx1``, ``HxW`` or ``3xHxW``, RGB,
  one array per image or one ``N x H x W x 3`` block) are re-encoded losslessly as PNG, so
  every caller gets the same thing: a list of encoded images as ``bytes``.

Pickles can run arbitrary code when loaded, so the reader uses a restricted unpickler that
only resolves the few NumPy and builtin reconstructors these files need; any other global
is refused with an error naming the file.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from hfs.utils.atomic import atomic_write
from hfs.utils.errors import HfsError

_LATIN1 = {"latin1", "latin-1", "iso-8859-1", "iso8859-1", "l1"}


def _latin1_encode(text: str, encoding: str = "latin1", errors: str = "strict") -> bytes:
    """Stand-in for ``_codecs.encode``: Python 3 pickles (protocol < 3) store bytes this way."""
    if not isinstance(text, str) or str(encoding).lower() not in _LATIN1:
        raise pickle.UnpicklingError(f"_codecs.encode is only allowed for latin1 text, got {encoding!r}")
    return text.encode("latin1", errors)


def _numpy_core(module: str):
    """The NumPy module behind ``numpy.core.*`` (NumPy 1) or ``numpy._core.*`` (NumPy 2)."""
    import importlib

    leaf = module.rsplit(".", 1)[-1]
    for base in ("numpy._core", "numpy.core"):
        try:
            return importlib.import_module(f"{base}.{leaf}")
        except ImportError:
            continue
    raise pickle.UnpicklingError(f"cannot resolve {module}")


def _allowed_global(module: str, name: str) -> Any:
    """The only globals a .bin pickle may reference; everything else is refused."""
    if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name in ("_reconstruct", "scalar"):
        return getattr(_numpy_core(module), name)
    if module in ("numpy.core.numeric", "numpy._core.numeric") and name == "_frombuffer":
        return getattr(_numpy_core(module), name)
    if module == "numpy" and name in ("ndarray", "dtype"):
        return getattr(np, name)
    if module == "_codecs" and name == "encode":
        return _latin1_encode
    if module in ("builtins", "__builtin__") and name in ("bytes", "bytearray"):
        return {"bytes": bytes, "bytearray": bytearray}[name]
    return None


class _RestrictedUnpickler(pickle.Unpickler):
    """An Unpickler that resolves only :func:`_allowed_global` names (no code execution)."""

    def find_class(self, module: str, name: str) -> Any:
        obj = _allowed_global(module, name)
        if obj is None:
            raise pickle.UnpicklingError(f"refusing to load global '{module}.{name}' "
                                         "(a verification .bin only needs numpy/bytes reconstructors)")
        return obj


def _unpickle(path: Path) -> Any:
    """Read the file and unpickle it safely; any failure is one HfsError naming the file."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise HfsError(f"cannot read verification file {path}: {exc.strerror or exc}") from None
    try:
        return _RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()
    except pickle.UnpicklingError as exc:
        raise HfsError(f"{path}: not a readable verification .bin ({exc})") from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            ImportError, OverflowError, MemoryError) as exc:
        what = "truncated" if isinstance(exc, EOFError) else f"corrupt: {type(exc).__name__}"
        raise HfsError(f"{path}: not a readable verification .bin ({what} pickle)") from None


def _png_bytes(arr: np.ndarray) -> bytes:
    """Losslessly encode a decoded image array (RGB, grey, or channel-first) as PNG."""
    from PIL import Image

    if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
        arr = arr.transpose(1, 2, 0)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr)).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _as_encoded(item: Any, path: Path, index: int) -> bytes:
    """One image of any of the circulating encodings -> encoded bytes."""
    if isinstance(item, bytes):
        return item
    if isinstance(item, (bytearray, memoryview)):
        return bytes(item)
    if isinstance(item, str):  # a Python 2 str, read as latin1: the same bytes back
        return item.encode("latin1")
    if isinstance(item, np.ndarray) and item.dtype == np.uint8:
        if item.ndim == 1:
            return item.tobytes()
        if item.ndim == 2 or (item.ndim == 3 and (item.shape[-1] in (1, 3) or item.shape[0] in (1, 3))):
            return _png_bytes(item)
    desc = f"{type(item).__name__}" + (f" {item.dtype} {item.shape}" if isinstance(item, np.ndarray) else "")
    raise HfsError(f"{path}: image {index} is a {desc}; expected encoded bytes or a uint8 image array")


def _image_items(images: Any, path: Path) -> Sequence[Any]:
    """The per-image items of the images container (list, tuple or array)."""
    if isinstance(images, (list, tuple)):
        return images
    if isinstance(images, np.ndarray):
        if images.dtype == object and images.ndim == 1:
            return list(images)
        if images.dtype == np.uint8 and images.ndim == 4:
            return list(images)
    raise HfsError(f"{path}: not a verification pair file (images are a {type(images).__name__}, "
                   "expected a list of encoded images)")


def _issame_array(issame: Any, path: Path) -> np.ndarray:
    try:
        arr = np.asarray(issame)
    except (TypeError, ValueError):
        arr = None
    if arr is None or arr.ndim != 1 or not (arr.dtype == bool or np.issubdtype(arr.dtype, np.integer)):
        raise HfsError(f"{path}: not a verification pair file (issame must be a 1-D list of booleans)")
    if arr.dtype != bool and not np.isin(arr, (0, 1)).all():
        raise HfsError(f"{path}: not a verification pair file (issame holds values other than 0/1)")
    return arr.astype(bool)


def load_bin(path: str | Path) -> tuple[list[bytes], np.ndarray]:
    """Load a verification .bin: (2N encoded images as bytes, issame bool array of N pairs).

    Images ``2i`` and ``2i + 1`` are pair ``i``. Encoded images are returned byte for byte as
    stored; decoded arrays come back PNG-encoded (lossless). Decode with
    :func:`hfs.data.transforms.decode_image`.
    """
    path = Path(path)
    obj = _unpickle(path)
    if not isinstance(obj, (tuple, list)) or len(obj) != 2:
        raise HfsError(f"{path}: not a verification pair file (expected a pickled (images, issame) pair, "
                       f"got {type(obj).__name__})")
    items = _image_items(obj[0], path)
    issame = _issame_array(obj[1], path)
    if len(items) != 2 * len(issame):
        raise HfsError(f"{path}: {len(items)} images but {len(issame)} pairs "
                       f"(a verification .bin needs exactly 2 images per pair, i.e. {2 * len(issame)})")
    images = [_as_encoded(item, path, i) for i, item in enumerate(items)]
    return images, issame


def write_bin(path: str | Path, images: Sequence[bytes], issame: Sequence[bool] | np.ndarray) -> None:
    """Write a verification .bin atomically, readable by hfs and by InsightFace's own loader.

    The pickle (protocol 4) holds a list of ``bytes`` and a plain list of ``bool``, so no NumPy
    is needed to read it back.
    """
    pairs = [bool(x) for x in np.asarray(issame).reshape(-1)]
    if len(images) != 2 * len(pairs):
        raise ValueError(f"write_bin({path}): {len(images)} images for {len(pairs)} pairs; need {2 * len(pairs)}")
    blobs = []
    for i, img in enumerate(images):
        if not isinstance(img, (bytes, bytearray, memoryview)):
            raise TypeError(f"write_bin({path}): image {i} is a {type(img).__name__}, expected encoded bytes")
        blobs.append(bytes(img))
    with atomic_write(path, "wb") as fh:
        pickle.dump((blobs, pairs), fh, protocol=4)


def bin_name(path: str | Path) -> str:
    """The set's display name: ``lfw`` for ``.../lfw.bin``."""
    return Path(path).stem
