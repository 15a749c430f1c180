"""Presenting verification results: one rich table, a JSON summary, an ROC plot (optional extra)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from hfs.eval.verification import VerificationResult
from hfs.utils.atomic import atomic_write_text


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
    from hfs.utils.plotting import require_matplotlib as require_plot

    return require_plot("--plot")


def plot_roc(path: str | Path, results: Mapping[str, VerificationResult]) -> None:
    """Draw every set's ROC (TAR against FAR, log FAR axis) into one PNG, written atomically."""
    from hfs.utils.plotting import figure, save_png

    with figure(figsize=(6, 5)) as (fig, ax):
        for name, r in results.items():
            keep = r.roc.fpr > 0  # a log axis cannot show FAR = 0
            ax.plot(r.roc.fpr[keep], r.roc.tpr[keep], label=f"{name} (AUC {r.auc:.4f}, EER {r.eer:.4f})")
        ax.set_xscale("log")
        ax.set_xlabel("false accept rate")
        ax.set_ylabel("true accept rate")
        ax.set_ylim(0, 1.01)
        ax.legend(loc="lower right")
        save_png(fig, path)
