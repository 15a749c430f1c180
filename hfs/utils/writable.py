"""Output paths checked before any work starts.

A command that computes for minutes and then cannot write its result has lost those minutes
(and a trainer that cannot checkpoint loses the run). Every command that writes calls these
on its output paths first; the error names the flag or config key the path came from.
Nothing is created here: a path that does not exist yet only needs a writable ancestor.
"""

from __future__ import annotations

import os
from pathlib import Path

from hfs.utils.errors import HfsError


def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path(".")


def _require_creatable(path: Path, name: str) -> None:
    """``path`` does not exist: its nearest existing ancestor must be a writable folder."""
    ancestor = _nearest_existing(path.parent)
    if not ancestor.is_dir():
        raise HfsError(f"{name} {path}: {ancestor} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise HfsError(f"{name} {path}: cannot create it, {ancestor} is not writable")


def require_writable_dir(path: str | Path, name: str) -> None:
    """``path`` is, or can become, a folder this process writes into; ``name`` is the flag or key."""
    path = Path(path)
    if path.exists():
        if not path.is_dir():
            raise HfsError(f"{name} {path}: is a file, not a folder")
        if not os.access(path, os.W_OK | os.X_OK):
            raise HfsError(f"{name} {path}: folder is not writable")
        return
    _require_creatable(path, name)


def require_writable_file(path: str | Path, name: str) -> None:
    """``path`` can be written (atomically: temp file beside it, then rename)."""
    path = Path(path)
    if path.is_dir():
        raise HfsError(f"{name} {path}: is a folder, not a file")
    if path.parent.is_dir():
        if not os.access(path.parent, os.W_OK | os.X_OK):
            raise HfsError(f"{name} {path}: folder {path.parent} is not writable")
        return
    _require_creatable(path, name)
