"""Snapshot folders: one directory per snapshot, a `.npy` per array and a `manifest.json`.

A snapshot is written into a temporary folder and renamed into place
(`hfs.utils.atomic.atomic_dir`), so a kill at any instant leaves every earlier snapshot
complete. Only folders holding a `manifest.json` count as snapshots; the `.npy` files are
plain NumPy arrays that `np.load(..., mmap_mode="r")` can map without reading them.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
import zlib
from pathlib import Path
from typing import Mapping

import numpy as np

from hfs.utils.atomic import atomic_dir, atomic_write_text
from hfs.utils.errors import HfsError

log = logging.getLogger(__name__)

SNAPSHOT_FORMAT = 1
MANIFEST = "manifest.json"
AUTO_PREFIX = "step-"
#: Names of snapshots and matrices: plain file names, no separators, no leading dot.
_PLAIN_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
#: Test hook: seconds to sleep after the first array is written (lets a test kill -9 mid-snapshot).
PAUSE_ENV = "HFS_PS_SNAPSHOT_PAUSE_S"


class SnapshotError(HfsError):
    """A snapshot name, folder or file is wrong; the message names it."""


def check_plain_name(name: object, what: str = "snapshot name") -> str:
    """Accept only a plain name inside the folder: no '/', '\\', '..', absolute path or leading dot."""
    if not isinstance(name, str) or not _PLAIN_NAME.match(name) or ".." in name:
        raise SnapshotError(f"{what} {name!r} must be a plain name (letters, digits, '_', '-', '.'; "
                            "no '/', '..' or leading '.'), not a path")
    return name


def auto_name(step: int) -> str:
    """The name of an automatic snapshot taken before ``step`` runs."""
    return f"{AUTO_PREFIX}{step:09d}"


def crc32_of(array: np.ndarray) -> int:
    """CRC-32 of an array's bytes, read in 64 MiB slices so no copy of a big array is made."""
    flat = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
    crc = 0
    step = 64 << 20
    for start in range(0, flat.size, step):
        crc = zlib.crc32(flat[start:start + step], crc)
    return crc


def _pause_for_tests() -> None:
    pause = os.environ.get(PAUSE_ENV)
    if pause:
        time.sleep(float(pause))


def write_snapshot(directory: Path, name: str, meta: Mapping, arrays: Mapping[str, np.ndarray]) -> Path:
    """Write ``arrays`` (file stem -> array) and a manifest with ``meta`` as ``directory/name``."""
    check_plain_name(name)
    target = Path(directory) / name
    try:
        return _write_snapshot_files(target, name, meta, arrays)
    except OSError as exc:
        raise SnapshotError(f"cannot write snapshot {target}: {exc.strerror or exc}") from None


def _write_snapshot_files(target: Path, name: str, meta: Mapping, arrays: Mapping[str, np.ndarray]) -> Path:
    files = {}
    with atomic_dir(target) as tmp:
        for i, (stem, array) in enumerate(arrays.items()):
            check_plain_name(stem, "array name")
            fname = f"{stem}.npy"
            with open(tmp / fname, "wb") as fh:
                np.save(fh, array, allow_pickle=False)
                fh.flush()
                os.fsync(fh.fileno())
            files[stem] = {"file": fname, "shape": list(array.shape), "dtype": str(array.dtype),
                           "crc32": crc32_of(array)}
            if i == 0:
                _pause_for_tests()
        manifest = {"format": SNAPSHOT_FORMAT, "name": name, "created": time.time(), **meta, "files": files}
        atomic_write_text(tmp / MANIFEST, json.dumps(manifest, indent=1))
    return target


def read_manifest(folder: Path) -> dict:
    path = Path(folder) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SnapshotError(f"snapshot manifest {path} is unreadable: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != SNAPSHOT_FORMAT:
        raise SnapshotError(f"snapshot manifest {path}: unknown format {manifest.get('format')!r}"
                            if isinstance(manifest, dict) else f"snapshot manifest {path} is not an object")
    return manifest


def load_array(folder: Path, entry: Mapping) -> np.ndarray:
    """Read one array of a snapshot into RAM and check its shape, dtype and CRC."""
    path = Path(folder) / check_plain_name(entry.get("file"), "snapshot file")
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise SnapshotError(f"snapshot file {path} is unreadable: {exc}") from None
    if list(array.shape) != list(entry.get("shape", [])) or str(array.dtype) != entry.get("dtype"):
        raise SnapshotError(f"snapshot file {path} holds {array.dtype}{list(array.shape)}, "
                            f"manifest says {entry.get('dtype')}{entry.get('shape')}")
    if crc32_of(array) != entry.get("crc32"):
        raise SnapshotError(f"snapshot file {path} fails its CRC-32 check (corrupt)")
    return array


def list_snapshots(directory: Path) -> list[tuple[int, float, str]]:
    """Complete snapshots as (step, created, name), oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for child in directory.iterdir():
        if child.name.startswith(".") or not (child / MANIFEST).is_file():
            continue
        try:
            manifest = read_manifest(child)
        except SnapshotError as exc:
            log.warning("ignoring %s", exc)
            continue
        found.append((int(manifest.get("step", 0)), float(manifest.get("created", 0.0)), child.name))
    return sorted(found)


def resolve_snapshot(directory: Path, tag: str) -> Path:
    """The folder of snapshot ``tag`` ('latest' = the complete one with the highest step, then newest)."""
    directory = Path(directory)
    if tag == "latest":
        snaps = list_snapshots(directory)
        if not snaps:
            raise SnapshotError(f"no complete snapshot in {directory}")
        return directory / snaps[-1][2]
    folder = directory / check_plain_name(tag)
    if not (folder / MANIFEST).is_file():
        raise SnapshotError(f"no snapshot named {tag!r} in {directory}")
    return folder


def prune_snapshots(directory: Path, keep: int) -> list[str]:
    """Remove automatic snapshots (``step-*``) beyond the newest ``keep``; named ones stay."""
    auto = [s for s in list_snapshots(directory) if s[2].startswith(AUTO_PREFIX)]
    removed = []
    for _, _, name in auto[:max(0, len(auto) - keep)]:
        shutil.rmtree(Path(directory) / name, ignore_errors=True)
        removed.append(name)
    return removed


def remove_stale_temps(directory: Path) -> list[str]:
    """Delete half-written temp folders (``.name.*.tmp``, ``.name.old-*``) a killed writer left."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for child in directory.iterdir():
        if child.name.startswith(".") and child.is_dir() and (child.name.endswith(".tmp") or ".old-" in child.name):
            shutil.rmtree(child, ignore_errors=True)
            removed.append(child.name)
    return removed
