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


def install_hint(packages: str, extra: str) -> str:
    """How to install an optional extra. Never ``pip install 'hfs[extra]'``: on the public
    index ``hfs`` is an unrelated package; the extra installs from this checkout."""
    return f"pip install {packages} (or, in the hfs checkout, pip install -e '.[{extra}]')"
