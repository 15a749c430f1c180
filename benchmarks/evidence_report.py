"""Markdown tables for docs/benchmarks.md from the evidence scripts' JSON results.

    PYTHONPATH=. python benchmarks/evidence_report.py docs/results/cost_vs_scale.json \
        docs/results/scale_10m.json docs/results/accuracy_vs_cost.json

Each file is recognised by its command (which script wrote it); the tables quote the
command, date and load average recorded with the numbers.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def _ctx_line(ctx: dict[str, Any]) -> str:
    """Date, commit, load and command of a run, then of the earlier runs it resumed (``--resume``)."""
    earlier = "".join(_ctx_line(c) for c in ctx.get("earlier_runs", []))
    if earlier:
        earlier = "Resumed into the same file from:\n\n" + earlier
    return earlier + (f"Run {ctx['date_utc']} - {ctx.get('date_end_utc', '?')} UTC, commit {ctx.get('git_commit', '?')}, "
            f"load average {ctx['loadavg_start'][0]:.1f} at the start and {ctx.get('loadavg_end', [float('nan')])[0]:.1f} "
            f"at the end on {ctx['cpus']} cores.\n\n```bash\n{ctx['command']}\n```\n")


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:,.1f} ms" if seconds < 1 else f"{seconds:,.2f} s"


def cost_table(data: dict[str, Any]) -> str:
    rows = data["results"]
    samplers = [k for k in ("annoy", "random") if any(k in r for r in rows)]
    head = ["C", "D", "full step", "full peak RSS"]
    for s in samplers:
        head += [f"{s} step", f"{s} x faster", f"{s} peak RSS"]
    head += ["annoy build (amortised /100 steps)", "annoy x faster incl. upkeep"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        full = r["full"]
        cells = [f"{r['classes']:,}", str(r["dim"])]
        cells += ([_ms(full["median_step_s"]), f"{full['peak_rss_mb'] / 1024:.2f} GiB"] if "median_step_s" in full
                  else [f"skipped ({full['skipped']})", "-"])
        for s in samplers:
            res = r.get(s, {})
            if "median_step_s" not in res:
                cells += [f"skipped ({res.get('skipped', 'not run')})", "-", "-"]
                continue
            speed = res.get("speedup_vs_full")
            cells += [_ms(res["median_step_s"]), f"{speed:.0f}x" if speed else "-",
                      f"{res['peak_rss_mb'] / 1024:.2f} GiB (store {res['store_mb'] / 1024:.2f})"]
        annoy = r.get("annoy", {})
        if "build_s" in annoy:
            cells += [f"{annoy['build_s']:.1f} s ({_ms(annoy['amortised_build_s'])})",
                      f"{annoy['speedup_vs_full_with_upkeep']:.0f}x" if "speedup_vs_full_with_upkeep" in annoy else "-"]
        else:
            cells += ["-", "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return _ctx_line(data["context"]) + "\n" + "\n".join(lines) + "\n"


def _first_index_step(log: list[dict[str, Any]]) -> str:
    """The first logged step at which an index had been swapped in (``index_rebuilds`` >= 1)."""
    step = next((x["step"] for x in log if x.get("index_rebuilds", 0) >= 1), None)
    if step is None:
        return "never (uniform negatives throughout)" if any("index_rebuilds" in x for x in log) else "- (no index)"
    return f"step {step}"


def scale_table(data: dict[str, Any]) -> str:
    r, a = data["results"], data["context"]["args"]
    res = r["result"]
    log = r.get("log") or []
    losses = [(x["step"], x["loss"]) for x in log]
    rss = r.get("rss") or []
    lines = ["| measure | value |", "|---|---|",
             f"| classes x dim (server) | {a['classes']:,} x {a['dim']} |",
             f"| matrix creation in the server | {r['create_s']:.0f} s |",
             f"| steps, batch, sample_num, sampler | {res['steps']}, {a['batch']}, {a['sample_num']}, {a['sampler']} |",
             f"| median step (p10-p90) | {_ms(r['median_step_s'])} ({_ms(r['step_s_p10_p90'][0])} - {_ms(r['step_s_p10_p90'][1])}) |",
             f"| loss, first -> last logged window | {losses[0][1]:.2f} (step {losses[0][0]}) -> {losses[-1][1]:.2f} (step {losses[-1][0]}) |" if losses else "| loss | - |",
             f"| train accuracy, last window | {res['train_acc']:.1%} |",
             f"| top-1 of held-out views against all {a['classes']:,} classes | {res['val_top1']:.1%} |" if res.get("val_top1") is not None else "| top-1 | - |",
             f"| upkeep share (last window) | {log[-1]['upkeep_share']:.1%} |" if log else "| upkeep | - |",
             f"| index in use from (first logged step with a built index) | {_first_index_step(log)} |",
             f"| server RSS after creation | {r['server_rss_after_create_mb'] / 1024:.2f} GiB |",
             f"| server RSS during training (max of samples) | {max(x['server_rss_mb'] for x in rss) / 1024:.2f} GiB |" if rss else "| server RSS | - |",
             f"| server peak RSS incl. the final checkpoint's snapshot | {r['server_peak_rss_mb'] / 1024:.2f} GiB |",
             f"| trainer RSS during training (max of samples) | {max(x['trainer_rss_mb'] for x in rss) / 1024:.2f} GiB |" if rss else "| trainer RSS | - |",
             f"| trainer peak RSS (incl. final all-class validation) | {r['trainer_peak_rss_mb'] / 1024:.2f} GiB |",
             f"| whole run (training + validation + checkpoint) | {r['train_wall_s']:.0f} s |"]
    return _ctx_line(data["context"]) + "\n" + "\n".join(lines) + "\n"


def _median_range(values: list[float]) -> str:
    """``median`` as a percentage, with ``(min-max)`` when there are several values (seeds)."""
    import statistics

    text = f"{statistics.median(values):.2%}"
    if len(values) > 1:
        text += f" ({min(values) * 100:.2f}-{max(values) * 100:.2f})"
    return text


def _shares(r: dict[str, Any]) -> tuple[float, float, float]:
    """(query + selection, index maintenance in the training thread, background build CPU) / training wall time."""
    timers, wall = r.get("timers") or {}, r.get("train_seconds") or float("nan")
    query = timers.get("select", 0.0) / wall
    upkeep = (timers.get("observe", 0.0) + timers.get("refresh", 0.0)) / wall
    return query, upkeep, r.get("upkeep_bg_cpu_share", 0.0)


def accuracy_table(data: dict[str, Any]) -> str:
    """One line per cell: medians over its seeds, (min-max) when there are several."""
    import statistics

    cells: dict[str, list[dict[str, Any]]] = {}
    for r in data["results"]:
        cells.setdefault(r["cell"], []).append(r)
    full_step = statistics.median(r["median_step_s"] for r in cells["full"]) if "full" in cells else None
    lines = ["| cell | sample_num | seeds | top-1 (all classes) | verification | median step | vs full "
             "| query + selection | index upkeep (training thread) | index builds (background CPU) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for cell, runs in cells.items():
        step = statistics.median(r["median_step_s"] for r in runs)
        ratio = f"{step / full_step:.2f}x" if full_step else "-"
        top1 = _median_range([r["val_top1"] for r in runs])
        ver = _median_range([next(iter(r["verification"].values()), float("nan")) for r in runs])
        query, upkeep, bg = (statistics.median(x) for x in zip(*(_shares(r) for r in runs)))
        lines.append(f"| {cell} | {runs[0]['sample_num']:,} | {len(runs)} | {top1} | {ver} | {_ms(step)} | {ratio} "
                     f"| {query:.1%} | {upkeep:.1%} | {bg:.1%} |")
    return _ctx_line(data["context"]) + "\n" + "\n".join(lines) + "\n"


def index_table(data: dict[str, Any]) -> str:
    lines = ["| sampler | C | D | trees | build | query (256 features, k = 9) | peak RSS |", "|---|---|---|---|---|---|---|"]
    for r in data["results"]:
        lines.append(f"| {r['sampler']} | {r['classes']:,} | {r['dim']} | {r['trees'] or '-'} | {r['build_s']:.0f} s "
                     f"| {r['query_ms_per_batch']:.1f} ms | {r['peak_rss_mb'] / 1024:.2f} GiB |")
    return _ctx_line(data["context"]) + "\n" + "\n".join(lines) + "\n"


def render(path: Path) -> str:
    data = json.loads(path.read_text())
    cmd = data["context"]["command"]
    for key, fn in (("cost_vs_scale", cost_table), ("scale_10m", scale_table), ("accuracy_vs_cost", accuracy_table),
                    ("index_build", index_table)):
        if key in cmd:
            return fn(data)
    if "run_all_components" in cmd:
        return _ctx_line(data["context"]) + "\n" + data["results"]["table_markdown"] + "\n"
    raise SystemExit(f"{path}: not written by an evidence script")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="+", type=Path, help="JSON files written by the evidence scripts")
    for path in p.parse_args(argv).results:
        print(f"<!-- {path} -->\n{render(path)}")


if __name__ == "__main__":
    main()
