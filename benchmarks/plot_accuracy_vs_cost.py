"""Plot accuracy against step time from accuracy_vs_cost.py's JSON, as a PNG drawn with Pillow.

    PYTHONPATH=. python benchmarks/plot_accuracy_vs_cost.py docs/results/accuracy_vs_cost.json \
        --out docs/results/accuracy_vs_cost.png

Two panels: closed-set top-1 (all classes) and verification accuracy, each against the median
wall time per training step; one marker per cell, labelled ``sampler@sample_num``. Pillow is
a core dependency, so the plot needs no matplotlib.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

COLOURS = {"full": (0, 0, 0), "annoy": (31, 119, 180), "hnsw": (44, 160, 44), "exact": (148, 103, 189),
           "random": (214, 39, 40)}


def _nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    span = max(hi - lo, 1e-12)
    step = 10 ** math.floor(math.log10(span / count))
    for mult in (1, 2, 5, 10):
        if span / (step * mult) <= count:
            step *= mult
            break
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def draw_panel(draw, box: tuple[int, int, int, int], points: list[dict[str, Any]], key: str, title: str, font) -> None:
    """One scatter panel inside ``box`` (left, top, right, bottom) of the image."""
    left, top, right, bottom = box
    xs = [p["median_step_s"] * 1e3 for p in points]
    ys = [p[key] * 100 for p in points]
    x_lo, x_hi = 0.0, max(xs) * 1.15
    y_lo, y_hi = max(0.0, min(ys) - 5), min(100.0, max(ys) + 5)

    def px(x: float, y: float) -> tuple[float, float]:
        return (left + (x - x_lo) / (x_hi - x_lo) * (right - left),
                bottom - (y - y_lo) / max(y_hi - y_lo, 1e-9) * (bottom - top))

    draw.rectangle(box, outline=(0, 0, 0))
    draw.text((left, top - 22), title, fill=(0, 0, 0), font=font)
    for t in _nice_ticks(x_lo, x_hi):
        x, _ = px(t, y_lo)
        draw.line([(x, bottom), (x, bottom + 5)], fill=(0, 0, 0))
        draw.text((x - 10, bottom + 8), f"{t:g}", fill=(0, 0, 0), font=font)
    for t in _nice_ticks(y_lo, y_hi):
        _, y = px(x_lo, t)
        draw.line([(left - 5, y), (left, y)], fill=(0, 0, 0))
        draw.line([(left, y), (right, y)], fill=(230, 230, 230))
        draw.text((left - 45, y - 7), f"{t:g}%", fill=(0, 0, 0), font=font)
    draw.text(((left + right) // 2 - 80, bottom + 28), "median step time (ms)", fill=(0, 0, 0), font=font)
    for p, x, y in zip(points, xs, ys):
        cx, cy = px(x, y)
        colour = COLOURS.get(p["sampler"], (120, 120, 120))
        draw.ellipse([cx - 5, cy - 5, cx + 5, cy + 5], fill=colour)
        label = "full" if p["sampler"] == "full" else f"{p['sampler']}@{p['sample_num']}"
        draw.text((cx + 7, cy - 7), label, fill=colour, font=font)


def median_points(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One point per cell: the medians over its seeds of top-1, verification and step time."""
    import statistics

    cells: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        cells.setdefault(r["cell"], []).append(r)
    return [{"sampler": runs[0]["sampler"], "sample_num": runs[0]["sample_num"],
             "val_top1": statistics.median(r["val_top1"] for r in runs),
             "verify": statistics.median(next(iter(r["verification"].values()), float("nan")) for r in runs),
             "median_step_s": statistics.median(r["median_step_s"] for r in runs)} for runs in cells.values()]


def plot(results: dict[str, Any], out: Path) -> Path:
    from PIL import Image, ImageDraw, ImageFont

    points = median_points([r for r in results["results"] if r.get("val_top1") is not None])
    img = Image.new("RGB", (1200, 560), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    ctx = results["context"]
    args = ctx.get("args", {})
    draw.text((20, 10), f"Accuracy vs cost: C={args.get('classes')} synthetic identities, tiny backbone, "
                        f"{args.get('steps')} steps, B={args.get('batch')}, seeds {args.get('seeds') or [args.get('seed')]} (medians) "
                        f"({ctx['date_utc']} UTC, load {ctx['loadavg_start'][0]:.1f} on {ctx['cpus']} cores)",
              fill=(0, 0, 0), font=font)
    draw_panel(draw, (90, 70, 570, 480), points, "val_top1", "closed-set top-1 on held-out views (all classes)", font)
    draw_panel(draw, (690, 70, 1170, 480), points, "verify", "verification accuracy, held-out identities", font)
    out.parent.mkdir(parents=True, exist_ok=True)
    img.save(out)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", help="JSON written by benchmarks/accuracy_vs_cost.py")
    p.add_argument("--out", default="docs/results/accuracy_vs_cost.png", help="PNG to write")
    args = p.parse_args(argv)
    print(plot(json.loads(Path(args.results).read_text()), Path(args.out)))


if __name__ == "__main__":
    main()
