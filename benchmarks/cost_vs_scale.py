"""Classifier-layer step time and peak memory, full vs sampled softmax, as C grows.

    PYTHONPATH=. python benchmarks/cost_vs_scale.py --classes 10000 100000 1000000 \
        --dims 128 256 --out docs/results/cost_vs_scale.json

One *classifier-layer step* is what the classifier costs per optimizer step given the
backbone's features (B x D, requires_grad):

- full: ``FullFC`` forward (ArcFace over all C rows), backward, SGD-with-momentum update of
  the C x D parameter (the backbone optimizer's share for the classifier);
- sampled: ``SampledFC`` forward (sampler query + selection rule + store get of S rows),
  head forward/backward over the S rows, the gradient push (the store applies SGD with
  momentum), waiting for the push, and the selector's per-step upkeep — the same calls the
  trainer makes. The index is built once before timing (``build_s``, recorded) and the
  amortised upkeep is quoted separately as ``build_s / interval``.

The timing itself is `hfs bench-fc`'s (`hfs.bench.fc.time_full_steps` and
``time_sampled_steps``); this script adds the grid over C and D, a fresh process per case
(so its peak RSS is its own), the memory-based skip of full softmax, and ratios. Full softmax is
skipped where its estimated memory (weight, gradient, momentum and four B x C float
buffers) exceeds ``--full-max-gb``. Medians over ``--steps`` timed steps after warm-up.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from evidence_common import script_parser, start_run, write_results  # noqa: E402

from hfs.utils.process import peak_rss_mb  # noqa: E402

log = logging.getLogger("cost_vs_scale")


def full_softmax_bytes(classes: int, dim: int, batch: int) -> int:
    """Estimated working set of one full-softmax step: 3 C x D matrices + 4 B x C buffers."""
    return 4 * (3 * classes * dim + 4 * batch * classes)


def _config(sampler: str, sample_num: int, batch: int, annoy_trees: int, dim: int):
    """Default config (ArcFace head, in-process store) with this case's sampler and sizes; the
    index is built once in the foreground and never refreshed while timing."""
    from hfs.config import config_from_dict

    return config_from_dict({
        "model": {"embedding_size": dim},
        "fc": {"mode": "sampled", "sample_num": sample_num},
        "train": {"batch_size": batch},
        "sampler": {"type": sampler, "background": False, "refresh": "interval", "interval": 1_000_000_000,
                    "max_interval": 0, "annoy_trees": annoy_trees},
    })


def _set_threads(threads: int) -> None:
    """Pin torch's intra-op threads in this (benchmark) process: on a 2-core box shared with
    other jobs, 2 spinning OpenMP threads made small matmuls 10-100x slower and very noisy."""
    import torch

    if threads > 0:
        torch.set_num_threads(threads)


def time_full_step(classes: int, dim: int, batch: int, steps: int, warmup: int,
                   threads: int = 1) -> dict[str, Any]:
    """Median wall time of full-softmax classifier steps (`hfs bench-fc`'s timing), and peak RSS."""
    from hfs.bench.fc import time_full_steps

    _set_threads(threads)
    rss0 = peak_rss_mb()
    cfg = _config("random", classes, batch, 1, dim)
    times = time_full_steps(cfg, classes, batch, steps, warmup)
    return {"step_s": times, "median_step_s": statistics.median(times), "peak_rss_mb": peak_rss_mb(),
            "rss_before_mb": rss0, "active": classes}


def time_sampled_step(classes: int, dim: int, batch: int, steps: int, warmup: int, sampler: str = "annoy",
                      sample_num: int = 1000, annoy_trees: int = 10, threads: int = 1) -> dict[str, Any]:
    """Median wall time of sampled classifier steps (`hfs bench-fc`'s timing: SampledFC on the
    in-process store), the index build time, and peak RSS."""
    from hfs.bench.fc import time_sampled_steps

    _set_threads(threads)
    rss0 = peak_rss_mb()
    cfg = _config(sampler, sample_num, batch, annoy_trees, dim)
    res = time_sampled_steps(cfg, classes, batch, steps, warmup)
    times = res["times"]
    return {"step_s": times, "median_step_s": statistics.median(times),
            "mean_parts_s": {k: v / len(times) for k, v in res["timers"].items()},
            "build_s": res["build_s"], "peak_rss_mb": peak_rss_mb(), "rss_before_mb": rss0,
            "store_mb": 2 * classes * dim * 4 / 2**20, "active": min(sample_num, classes), "sampler": sampler,
            "annoy_trees": annoy_trees if sampler == "annoy" else None}


def _in_fresh_process(fn, *args, **kwargs) -> dict[str, Any]:
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(fn, *args, **kwargs).result()


def run_grid(classes: list[int], dims: list[int], batch: int, sample_num: int, samplers: list[str], steps: int,
             warmup: int, full_max_gb: float, annoy_trees: int, annoy_max_classes: int,
             interval: int, threads: int = 1, fresh_process: bool = True, full_steps: int = 0,
             on_row=None) -> list[dict[str, Any]]:
    """Every (C, D): full (where it fits) and each sampler, in the same run; ratios vs full.

    ``full_steps`` (when > 0) times fewer full-softmax steps (one takes about a minute at
    C=1M on this box); ``on_row(rows)`` is called after every (C, D) so partial results survive.
    """
    call = _in_fresh_process if fresh_process else (lambda fn, *a, **k: fn(*a, **k))
    rows = []
    for dim in dims:
        for c in classes:
            row: dict[str, Any] = {"classes": c, "dim": dim, "batch": batch, "sample_num": sample_num}
            need = full_softmax_bytes(c, dim, batch)
            if need <= full_max_gb * 2**30:
                log.info("full C=%d D=%d", c, dim)
                row["full"] = call(time_full_step, c, dim, batch, full_steps or steps, warmup, threads=threads)
            else:
                row["full"] = {"skipped": f"needs ~{need / 2**30:.1f} GiB > --full-max-gb {full_max_gb}"}
            for name in samplers:
                if name == "annoy" and c > annoy_max_classes:
                    row[name] = {"skipped": f"C > --annoy-max-classes {annoy_max_classes}"}
                    continue
                log.info("sampled/%s C=%d D=%d", name, c, dim)
                res = call(time_sampled_step, c, dim, batch, steps, warmup, name, sample_num, annoy_trees,
                           threads=threads)
                res["amortised_build_s"] = res["build_s"] / interval if name != "random" else 0.0
                res["with_upkeep_s"] = res["median_step_s"] + res["amortised_build_s"]
                if "median_step_s" in row["full"]:
                    res["speedup_vs_full"] = row["full"]["median_step_s"] / res["median_step_s"]
                    res["speedup_vs_full_with_upkeep"] = row["full"]["median_step_s"] / res["with_upkeep_s"]
                row[name] = res
            rows.append(row)
            if on_row is not None:
                on_row(rows)
            log.info("%s", {k: (v.get("median_step_s") if isinstance(v, dict) else v) for k, v in row.items()})
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = script_parser(__doc__)
    p.add_argument("--classes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000], help="class counts C")
    p.add_argument("--dims", type=int, nargs="+", default=[128, 256], help="embedding sizes D")
    p.add_argument("--batch", type=int, default=256, help="batch size B")
    p.add_argument("--sample-num", type=int, default=1000, help="active classes S per sampled step")
    p.add_argument("--samplers", nargs="+", default=["annoy", "random"], help="samplers to time in sampled mode")
    p.add_argument("--steps", type=int, default=5, help="timed steps per case (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--full-steps", type=int, default=0, help="timed full-softmax steps (0 = --steps)")
    p.add_argument("--full-max-gb", type=float, default=12.0, help="skip full softmax above this estimated memory")
    p.add_argument("--annoy-trees", type=int, default=10, help="trees of the annoy forest")
    p.add_argument("--annoy-max-classes", type=int, default=1_000_000, help="largest C at which annoy is built")
    p.add_argument("--interval", type=int, default=100,
                   help="steps between index rebuilds used to amortise build time (the paper's interval)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads per case (0 = torch default)")
    p.add_argument("--out", default="docs/results/cost_vs_scale.json", help="JSON results file")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    context = start_run(args)
    rows = run_grid(args.classes, args.dims, args.batch, args.sample_num, args.samplers, args.steps, args.warmup,
                    args.full_max_gb, args.annoy_trees, args.annoy_max_classes, args.interval, args.threads,
                    full_steps=args.full_steps, on_row=lambda done: write_results(args.out, context, done))
    log.info("wrote %s (%d rows)", args.out, len(rows))


if __name__ == "__main__":
    main()
