"""Plot accuracy against step time from accuracy_vs_cost.py's JSON, with matplotlib (the `plot` extra).

    PYTHONPATH=. python benchmarks/plot_accuracy_vs_cost.py docs/results/accuracy_vs_cost.json \
        --out docs/results/accuracy_vs_cost.png

Two panels: closed-set top-1 (all classes) and verification accuracy, each against the wall
time per training step. One point per cell at the median over its seeds, with min-max error
bars over the seeds (accuracy: solid; step time: light); colour is the sampler, marker the sample_num, and a thin
line joins a sampler's cells. The legend names every colour and marker, so no label sits on
the data. The look is `hfs verify --plot`'s (hfs.utils.plotting).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

COLOURS = {"full": "black", "annoy": "tab:blue", "hnsw": "tab:green", "exact": "tab:purple", "random": "tab:red"}
MARKERS = ("o", "s", "^", "D", "v", "P", "X")
PANELS = (("val_top1", "closed-set top-1 on held-out views (all classes)"),
          ("verify", "verification accuracy, held-out identities"))


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def cell_summaries(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per cell, in the JSON's order: median, min and max over its seeds of top-1,
    verification accuracy and median step time (ms)."""
    cells: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        cells.setdefault(r["cell"], []).append(r)
    return [{"cell": cell, "sampler": runs[0]["sampler"], "sample_num": runs[0]["sample_num"], "seeds": len(runs),
             "val_top1": _spread([r["val_top1"] for r in runs]),
             "verify": _spread([next(iter(r["verification"].values()), float("nan")) for r in runs]),
             "step_ms": _spread([r["median_step_s"] * 1e3 for r in runs])} for cell, runs in cells.items()]


def _bars(s: dict[str, float], scale: float = 1.0) -> list[list[float]]:
    """matplotlib's asymmetric error: [[below], [above]] the median."""
    return [[(s["median"] - s["min"]) * scale], [(s["max"] - s["median"]) * scale]]


def _log_axis_with_plain_ticks(ax, lo: float, hi: float) -> None:
    """A log x axis labelled 10, 20, 50, 100, ... (no 3x10^1 minor labels running into each other)."""
    import math

    from matplotlib.ticker import FixedLocator, NullFormatter, NullLocator, ScalarFormatter

    ax.set_xscale("log")
    ticks = [m * 10 ** e for e in range(math.floor(math.log10(lo)) - 1, math.ceil(math.log10(hi)) + 1)
             for m in (1, 2, 5) if lo / 1.5 <= m * 10 ** e <= hi * 1.5]
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_minor_formatter(NullFormatter())


def draw_panel(ax, cells: list[dict[str, Any]], key: str, title: str, markers: dict[int, str]) -> None:
    """One panel: accuracy ``key`` (in %) against step time, cells grouped by sampler."""
    for sampler in dict.fromkeys(c["sampler"] for c in cells):
        mine = sorted((c for c in cells if c["sampler"] == sampler), key=lambda c: c["sample_num"])
        colour = COLOURS.get(sampler, "tab:gray")
        if len(mine) > 1:
            ax.plot([c["step_ms"]["median"] for c in mine], [100 * c[key]["median"] for c in mine],
                    color=colour, linewidth=0.8, alpha=0.4, zorder=1)
        for c in mine:
            x, y = c["step_ms"]["median"], 100 * c[key]["median"]
            ax.errorbar(x, y, xerr=_bars(c["step_ms"]), color=colour, elinewidth=0.8, capsize=2, alpha=0.35,
                        linestyle="none", zorder=2)  # step-time spread: lighter, accuracy is the point
            ax.errorbar(x, y, yerr=_bars(c[key], 100), color=colour, elinewidth=1.2, capsize=3,
                        marker="*" if sampler == "full" else markers[c["sample_num"]],
                        markersize=11 if sampler == "full" else 7, linestyle="none", zorder=3)
    steps = [c["step_ms"][k] for c in cells for k in ("min", "max")]
    if max(steps) > 5 * min(steps):
        _log_axis_with_plain_ticks(ax, min(steps), max(steps))
    ax.margins(x=0.08, y=0.08)
    ax.set_title(title)
    ax.set_xlabel("median wall time per training step (ms)")
    ax.set_ylabel("accuracy (%)")


def legend_handles(cells: list[dict[str, Any]], markers: dict[int, str], classes: int | None):
    """Handles naming each sampler's colour and each sample_num's marker."""
    from matplotlib.lines import Line2D

    handles = []
    for sampler in dict.fromkeys(c["sampler"] for c in cells):
        full = sampler == "full"
        handles.append(Line2D([], [], color=COLOURS.get(sampler, "tab:gray"), marker="*" if full else "o",
                              markersize=10 if full else 7, linestyle="none",
                              label="full softmax" if full else sampler))
    for num, marker in markers.items():
        share = f" ({100 * num / classes:g}% of C)" if classes else ""
        handles.append(Line2D([], [], color="dimgray", marker=marker, linestyle="none",
                              label=f"S = {num:,}{share}"))
    return handles


def title_of(results: dict[str, Any], cells: list[dict[str, Any]]) -> str:
    ctx = results["context"]
    args = ctx.get("args", {})
    seeds = max((c["seeds"] for c in cells), default=1)
    spread = f"median over {seeds} seeds, bars min-max" if seeds > 1 else "one seed"
    load = ctx.get("loadavg_start") or [float("nan")]
    return (f"Accuracy vs cost: C = {args.get('classes', '?'):,} synthetic identities, tiny backbone, "
            f"{args.get('steps')} steps, B = {args.get('batch')} ({spread})\n"
            f"{ctx.get('date_utc', '')} UTC, load {load[0]:.1f} on {ctx.get('cpus', '?')} cores")


def plot(results: dict[str, Any], out: Path) -> Path:
    """Draw the two panels of ``results`` (accuracy_vs_cost.py's JSON) to the PNG ``out``."""
    from hfs.utils.plotting import figure, save_png

    cells = cell_summaries([r for r in results["results"] if r.get("val_top1") is not None])
    if not cells:
        raise SystemExit("error: no finished cells (with val_top1) in the results")
    nums = sorted({c["sample_num"] for c in cells if c["sampler"] != "full"})
    markers = {n: MARKERS[i % len(MARKERS)] for i, n in enumerate(nums)}
    classes = results["context"].get("args", {}).get("classes")
    with figure(1, 2, figsize=(12, 5.2), needed_by="plot_accuracy_vs_cost.py") as (fig, axes):
        for ax, (key, title) in zip(axes, PANELS):
            draw_panel(ax, cells, key, title, markers)
        handles = legend_handles(cells, markers, classes)
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 8), bbox_to_anchor=(0.5, -0.04))
        fig.suptitle(title_of(results, cells))
        fig.tight_layout(rect=(0, 0.05, 1, 1))
        return save_png(fig, out)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", help="JSON written by benchmarks/accuracy_vs_cost.py")
    p.add_argument("--out", default="docs/results/accuracy_vs_cost.png", help="PNG to write")
    args = p.parse_args(argv)
    from hfs.utils.errors import HfsError

    try:
        print(plot(json.loads(Path(args.results).read_text()), Path(args.out)))
    except HfsError as exc:  # matplotlib missing: the one-line install hint
        raise SystemExit(f"error: {exc}") from None


if __name__ == "__main__":
    main()
