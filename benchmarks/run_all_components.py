"""The parameter server's and the samplers' own benchmarks, run together into one table.

    PYTHONPATH=. python benchmarks/run_all_components.py --num-classes 100000 --dim 256 \
        --out docs/results/components.json

Calls the library functions behind `hfs bench-paramserver` (`hfs.bench.paramserver`) and
`hfs bench-sampler` (`hfs.bench.sampler`) one after the other in this process, so both see
the same machine state, and writes their results plus one combined markdown table (the
one quoted in docs/benchmarks.md) into the JSON file.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from evidence_common import script_parser, start_run, write_results  # noqa: E402

log = logging.getLogger("run_all_components")


def paramserver_rows(ps: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(component, measure, value) rows of `hfs bench-paramserver`'s results."""
    w = ps["config"]["workers"]
    mem = ps["memory"]
    return [
        ("paramserver", "in-process get+push round trips/s", f"{ps['inprocess_rt_per_s']:.0f}"),
        ("paramserver", "loopback get+push round trips/s", f"{ps['loopback_rt_per_s']:.0f}"),
        ("paramserver", "loopback / in-process", f"{ps['loopback_over_inprocess']:.2f}"),
        ("paramserver", "sync step, 1 worker (ms)", f"{ps['sync_1_worker_ms']:.2f}"),
        ("paramserver", f"sync step, {w} workers (ms)", f"{ps[f'sync_{w}_workers_ms']:.2f}"),
        ("paramserver", f"{w} workers / 1 worker", f"{ps['sync_ratio']:.2f}"),
        ("paramserver", f"RSS after creating {mem['rows']:,} x {mem['dim']} (GiB)", f"{mem['rss_gib']:.2f}"),
    ]


def sampler_rows(report: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(component, measure, value) rows of `hfs bench-sampler`'s results."""
    k = report["settings"]["k"]
    rows = []
    for r in report["query"]:
        recall = r[f"recall_at_{k}"]
        name = f"sampler {r['sampler']}"
        rows += [(name, "build s", f"{r['build_s']:.2f}"), (name, "query ms/batch", f"{r['query_ms']:.1f}"),
                 (name, f"recall@{k}", "-" if recall is None else f"{recall:.3f}"),
                 (name, "softmax-mass coverage (x random)",
                  f"{r['coverage']:.4f} ({r['coverage_vs_random']:.1f}x)" if r["coverage_vs_random"] else
                  f"{r['coverage']:.4f}"),
                 (name, "peak memory MB", f"{r['peak_mem_mb']:.0f}")]
    for r in report.get("upkeep", []):
        name = f"sampler {r['sampler']} upkeep"
        rows += [(name, "live step ms", f"{r['live_step_ms']:.1f}"),
                 (name, "upkeep share of wall time", f"{100 * r['upkeep_share']:.1f}%"),
                 (name, "wall time added vs frozen index", f"{100 * r['added_share']:+.1f}%")]
    return rows


def markdown_table(rows: list[tuple[str, str, str]]) -> str:
    lines = ["| component | measure | value |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines)


def run_components(args: argparse.Namespace) -> dict[str, Any]:
    """Both benchmarks, same process, one after the other; returns their results and the table."""
    from hfs.bench.paramserver import BenchConfig, run_benchmark
    from hfs.bench.sampler import SamplerBenchSettings, run_sampler_bench
    from hfs.config import load_config

    ps_cfg = BenchConfig(rows=args.sample_num, dim=args.dim, num_classes=args.num_classes, seconds=args.seconds,
                         workers=args.workers, sync_steps=args.sync_steps, memory_rows=args.memory_rows,
                         memory_dim=args.memory_dim)
    log.info("bench-paramserver %s", ps_cfg)
    ps = run_benchmark(ps_cfg)
    cfg = load_config(None, [f"sampler.annoy_trees={args.annoy_trees}"] if args.annoy_trees else [])
    settings = SamplerBenchSettings(num_classes=args.num_classes, dim=args.dim, batch_size=args.batch_size,
                                    sample_num=args.sample_num, samplers=args.samplers, batches=args.batches,
                                    upkeep_steps=args.upkeep_steps, upkeep_samplers=args.upkeep_samplers)
    log.info("bench-sampler %s", settings)
    samplers = run_sampler_bench(cfg, settings)
    rows = paramserver_rows(ps) + sampler_rows(samplers)
    return {"paramserver": ps, "sampler": samplers, "table_markdown": markdown_table(rows)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = script_parser(__doc__)
    p.add_argument("--num-classes", type=int, default=100_000, help="classes C of both benchmarks")
    p.add_argument("--dim", type=int, default=256, help="embedding size D")
    p.add_argument("--batch-size", type=int, default=256, help="queries per batch B (sampler)")
    p.add_argument("--sample-num", type=int, default=1000, help="active classes S (sampler) = rows per get/push (server)")
    p.add_argument("--samplers", nargs="+", default=["annoy", "hnsw", "exact", "random"], help="samplers to compare")
    p.add_argument("--annoy-trees", type=int, default=0, help="annoy trees (0 = the config default)")
    p.add_argument("--batches", type=int, default=5, help="query batches per sampler")
    p.add_argument("--upkeep-steps", type=int, default=0, help="simulated training steps of the upkeep measurement (0 = skip)")
    p.add_argument("--upkeep-samplers", nargs="+", default=["annoy", "hnsw"], help="samplers of the upkeep measurement")
    p.add_argument("--seconds", type=float, default=3.0, help="seconds per round-trip measurement (server)")
    p.add_argument("--workers", type=int, default=4, help="workers of the synchronous-step measurement (server)")
    p.add_argument("--sync-steps", type=int, default=100, help="synchronous steps per measurement (server)")
    p.add_argument("--memory-rows", type=int, default=2_000_000, help="rows of the server memory check")
    p.add_argument("--memory-dim", type=int, default=128, help="columns of the server memory check")
    p.add_argument("--out", default="docs/results/components.json", help="JSON results file")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    context = start_run(args)
    results = run_components(args)
    print(results["table_markdown"])
    log.info("wrote %s", write_results(args.out, context, results))


if __name__ == "__main__":
    main()
