"""The one look of every chart hfs draws (matplotlib, the optional ``plot`` extra).

`hfs verify --plot` and the benchmark charts (benchmarks/plot_accuracy_vs_cost.py) draw
through :func:`figure` and :func:`save_png`, so they share fonts, grid, size and resolution,
and every PNG is written atomically.
"""

from __future__ import annotations

import io
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from hfs.utils.atomic import atomic_write
from hfs.utils.optional import install_hint, require

INSTALL_HINT = install_hint("matplotlib", "plot")  # not 'hfs[plot]': hfs on PyPI is another package

#: matplotlib rc settings of every hfs chart
STYLE: dict[str, Any] = {
    "figure.dpi": 120,
    "savefig.dpi": 120,
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "legend.fontsize": 8,
    "axes.grid": True,
    "axes.grid.which": "both",
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "legend.frameon": False,
}


def require_matplotlib(needed_by: str = "--plot"):
    """matplotlib, or a one-line error naming who needs it and how to install it."""
    return require("matplotlib", needed_by, INSTALL_HINT)


def pyplot(needed_by: str = "--plot"):
    """matplotlib.pyplot on the file-only Agg backend (no display needed)."""
    matplotlib = require_matplotlib(needed_by)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


@contextmanager
def figure(nrows: int = 1, ncols: int = 1, *, figsize: tuple[float, float] = (6.0, 5.0),
           needed_by: str = "--plot", **kwargs) -> Iterator[tuple[Any, Any]]:
    """``(fig, axes)`` drawn in the house style; the figure is closed on exit."""
    plt = pyplot(needed_by)
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(nrows, ncols, figsize=figsize, **kwargs)
        try:
            yield fig, axes
        finally:
            plt.close(fig)


def save_png(fig, path: str | Path) -> Path:
    """Render ``fig`` to PNG in memory, then write it atomically (a failed draw leaves no half file)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "wb") as fh:
        fh.write(buf.getvalue())
    return path
