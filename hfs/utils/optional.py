"""Optional dependencies: import on first use, or fail with one line that says how to get them."""

from __future__ import annotations

import importlib
from types import ModuleType

from hfs.utils.errors import HfsError


def require(module: str, needed_by: str, install: str, alternative: str = "") -> ModuleType:
    """Import ``module``; if missing, an HfsError naming who needs it and the install command."""
    try:
        return importlib.import_module(module)
    except ImportError:
        hint = f" ({alternative})" if alternative else ""
        raise HfsError(f"{needed_by} needs the {module} package: {install}{hint}") from None
