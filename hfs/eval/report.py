"""Presenting verification results: one rich table, a JSON summary, an ROC plot (optional extra)."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, Mapping

from hfs.eval.verification import VerificationResult
from hfs.utils.atomic import atomic_write, atomic_write_text
from hfs.utils.optional import install_hint, require


def _far_label(far: float) -> str:
    """1e-3 -> '1e-3' (column headers stay short)."""
    mantissa, exponent = f"{far:.0e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def results_table(results: Mapping[str, VerificationResult], title: str = "verification"):
    """One row per set: accuracy and VAL in % (mean ± std over folds), threshold, AUC, EER."""
    from rich.table import Table

    far = next(iter(results.values())).far_target if results else 1e-3
    table = Table(title=title)
    for col in ("set", "pairs", "accuracy %", "threshold", f"VAL@FAR={_far_label(far)} %", "AUC", "EER"):
        table.add_column(col, justify="left" if col == "set" else "right")
    for name, r in results.items():
        table.add_row(name, str(r.pairs), f"{100 * r.accuracy:.2f} ± {100 * r.accuracy_std:.2f}",
                      f"{r.best_threshold:.2f}", f"{100 * r.val:.2f} ± {100 * r.val_std:.2f}",
                      f"{r.auc:.4f}", f"{r.eer:.4f}")
    return table


def write_results_json(path: str | Path, results: Mapping[str, VerificationResult],
                       extra: Mapping[str, Mapping[str, Any]] | None = None) -> None:
    """``{set: {metrics..., **extra[set]}}`` written atomically."""
    extra = extra or {}
    data = {name: {**r.to_dict(), **extra.get(name, {})} for name, r in results.items()}
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def require_matplotlib():
    """matplotlib (the optional ``plot`` extra), or a one-line error saying how to install it."""
    return require("matplotlib", "--plot", install_hint("matplotlib", "plot"))


def _pyplot():
    matplotlib = require_matplotlib()
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    return plt


def plot_roc(path: str | Path, results: Mapping[str, VerificationResult]) -> None:
    """Draw every set's ROC (TAR against FAR, log FAR axis) into one PNG, written atomically."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 5))
    try:
        for name, r in results.items():
            keep = r.roc.fpr > 0  # a log axis cannot show FAR = 0
            ax.plot(r.roc.fpr[keep], r.roc.tpr[keep], label=f"{name} (AUC {r.auc:.4f}, EER {r.eer:.4f})")
        ax.set_xscale("log")
        ax.set_xlabel("false accept rate")
        ax.set_ylabel("true accept rate")
        ax.set_ylim(0, 1.01)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(loc="lower right")
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    finally:
        plt.close(fig)
    with atomic_write(path, "wb") as fh:
        fh.write(buf.getvalue())
