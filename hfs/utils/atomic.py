"""Atomic writes: a killed process never leaves a half-written file or folder behind.

Every writer in hfs (checkpoints, snapshots, converted images, features, metrics summaries)
goes through these helpers: write to a temporary name in the same directory, fsync, rename.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import IO, Iterator


def _umask_mode(base: int) -> int:
    """``base`` with the process umask applied, as open()/mkdir() would (mkstemp uses 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    return base & ~mask


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "wb", fsync: bool = True) -> Iterator[IO]:
    """Open a temp file beside ``path``; on success rename it over ``path``, else delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, _umask_mode(0o666))
        with os.fdopen(fd, mode) as fh:
            yield fh
            fh.flush()
            if fsync:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if fsync:
        _fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes, fsync: bool = True) -> None:
    with atomic_write(path, "wb", fsync=fsync) as fh:
        fh.write(data)


def atomic_write_text(path: str | Path, text: str, fsync: bool = True) -> None:
    with atomic_write(path, "w", fsync=fsync) as fh:
        fh.write(text)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temp folder beside ``path``; on success it replaces ``path`` in one rename.

    A folder that already exists at ``path`` is moved aside first and removed only after
    the new one is in place, so at every instant one complete version exists.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        os.chmod(tmp, _umask_mode(0o777))
        yield tmp
        _fsync_dir(tmp)
        old = None
        if path.exists():
            old = path.parent / f".{path.name}.old-{os.getpid()}"
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
