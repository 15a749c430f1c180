"""Plot time_to_accuracy.py's curves: held-out top-1 and TAR against training time (matplotlib).

    PYTHONPATH=. python benchmarks/plot_time_to_accuracy.py docs/results/time_to_accuracy_20k*.json \
        --out docs/results/time_to_accuracy_20k.png [--clock cpu_s|wall_s] [--table]

Several result files of one regime (e.g. runs of other seeds or cells) are read as one.
``--table`` also prints the final numbers as a markdown table (medians over seeds, min-max).

Two panels (held-out top-1 over all classes; TAR at the run's FAR on unseen identities),
one line per cell: at each evaluation step the median over seeds of the metric against the
median time, with a band from the seeds' minimum to maximum. Colour is the sampler, line
style the rest of the cell (its sample_num and its own overrides, e.g. a ceiling). The look is `hfs verify --plot`'s (hfs.utils.plotting).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

COLOURS = {"full": "black", "annoy": "tab:blue", "hnsw": "tab:green", "exact": "tab:purple", "random": "tab:red",
           "ivf": "tab:orange"}
STYLES = ("-", "--", ":", "-.", (0, (5, 1)), (0, (3, 1, 1, 1, 1, 1)), (0, (1, 3)), (0, (8, 3, 2, 3)))
PANELS = (("val_top1", "held-out top-1 (all classes)"), ("tar", "TAR @ FAR {far:g}, unseen identities"))


def cell_curves(rows: list[dict[str, Any]], clock: str) -> list[dict[str, Any]]:
    """Per cell, in file order: steps, median time, and median/min/max of each metric over seeds."""
    cells: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        cells.setdefault(r["cell"], []).append(r)
    out = []
    for cell, runs in cells.items():
        steps = sorted(set.intersection(*({p["step"] for p in r["curve"]} for r in runs)))
        at = [{p["step"]: p for p in r["curve"]} for r in runs]
        entry = {"cell": cell, "sampler": runs[0]["sampler"], "rate": runs[0]["rate"], "seeds": len(runs),
                 "steps": steps, "time": [float(np.median([a[s][clock] for a in at])) for s in steps]}
        for key, _ in PANELS:
            values = np.array([[a[s][key] for s in steps] for a in at])
            entry[key] = {"median": np.median(values, 0), "min": values.min(0), "max": values.max(0)}
        out.append(entry)
    return out


def load(paths: list[str | Path]) -> dict[str, Any]:
    """The results of several files as one (the first file's context; a (cell, seed) seen twice is an error)."""
    files = [json.loads(Path(p).read_text()) for p in paths]
    rows, seen = [], set()
    for path, data in zip(paths, files):
        for r in data["results"]:
            key = (r["cell"], r["seed"])
            if key in seen:
                raise SystemExit(f"{path}: cell {r['cell']} seed {r['seed']} is in an earlier file too")
            seen.add(key)
            rows.append(r)
    return {"context": files[0]["context"], "results": rows}


def _spread(values: list[float], fmt: str) -> str:
    if len(values) == 1:
        return format(values[0], fmt)
    return f"{format(float(np.median(values)), fmt)} [{format(min(values), fmt)}-{format(max(values), fmt)}]"


def table(data: dict[str, Any]) -> str:
    """Final numbers per cell, in first-seen order: medians over seeds with [min-max]."""
    cells: dict[str, list[dict[str, Any]]] = {}
    for r in data["results"]:
        cells.setdefault(r["cell"], []).append(r)
    far = data["context"]["args"].get("far", 1e-4)
    lines = [f"| cell | seeds | held-out top-1 % | TAR @ FAR {far:g} % | training CPU s | converged |",
             "|---|---|---|---|---|---|"]
    for cell, runs in cells.items():
        lines.append(f"| {cell} | {len(runs)} | {_spread([100 * r['val_top1'] for r in runs], '.2f')} | "
                     f"{_spread([100 * r['tar'] for r in runs], '.2f')} | "
                     f"{_spread([r['train_cpu_s'] for r in runs], '.0f')} | "
                     f"{sum(bool(r['converged']) for r in runs)}/{len(runs)} |")
    return "\n".join(lines)


def plot(paths: str | Path | list[str | Path], out: str | Path, clock: str = "cpu_s") -> Path:
    from hfs.utils.plotting import figure, save_png

    data = load(paths if isinstance(paths, list) else [paths])
    far = data["context"]["args"].get("far", 1e-4)
    curves = cell_curves(data["results"], clock)
    variants = list(dict.fromkeys(_variant(c["cell"]) for c in curves if c["sampler"] != "full"))
    with figure(1, 2, figsize=(11.0, 4.6), needed_by="plot_time_to_accuracy.py") as (fig, axes):
        for ax, (key, title) in zip(axes, PANELS):
            for c in curves:
                style = "-" if c["sampler"] == "full" else STYLES[variants.index(_variant(c["cell"])) % len(STYLES)]
                colour = COLOURS.get(c["sampler"], "tab:gray")
                label = f"{c['cell']} ({c['seeds']} seed{'s' if c['seeds'] > 1 else ''})"
                ax.plot(c["time"], c[key]["median"], linestyle=style, color=colour, label=label, lw=1.4)
                ax.fill_between(c["time"], c[key]["min"], c[key]["max"], color=colour, alpha=0.15, lw=0)
            ax.set_title(title.format(far=far))
            ax.set_xlabel("training CPU seconds" if clock == "cpu_s" else "training wall seconds")
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=2, frameon=False)
        args = data["context"]["args"]
        length = (f"equal CPU budget {args['budget_cpu_s']:g} s" if args.get("budget_cpu_s")
                  else f"{args['steps']} steps")
        regime = (f"rendered faces {args['image_size']} px, tiny CNN, " if args.get("regime") == "images"
                  else "")
        messy = [f"{label} {args[key]:g}" for key, label in (("duplicates", "duplicates"), ("label_noise", "label noise"),
                                                             ("min_views", "min views")) if args.get(key)]
        regime += "".join(f"{m}, " for m in messy)
        fig.suptitle(f"{regime}C = {args['classes']:,}, batch {args['batch']}, {length} "
                     "(median over seeds, band: min-max)")
        return save_png(fig, out)


def _variant(cell: str) -> str:
    """What sets a cell's line style: its rate and its own overrides (colour is the sampler)."""
    return cell.split(":", 1)[-1]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="+", help="JSON files written by time_to_accuracy.py (one regime)")
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument("--clock", default="cpu_s", choices=("cpu_s", "wall_s"), help="time axis")
    p.add_argument("--table", action="store_true", help="also print the final numbers as a markdown table")
    args = p.parse_args(argv)
    print(plot(args.results, args.out, args.clock))
    if args.table:
        print(table(load(args.results)))


if __name__ == "__main__":
    main()
