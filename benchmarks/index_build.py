"""Index build time and peak memory of a sampler at large C, in a fresh process per case.

    PYTHONPATH=. python benchmarks/index_build.py --classes 1000000 10000000 --dim 128 \
        --sampler annoy --annoy-trees 2 --out docs/results/index_build.json

The rows are gaussian (the build cost of annoy and hnsw depends on C, D and the knobs, not
on how the vectors cluster), produced chunk by chunk as a weight store's ``iter_chunks``
would. ``build_s`` is ``ClassSampler.rebuild`` alone; peak RSS includes the rows fed in.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Iterator

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from evidence_common import record_each, script_parser, start_run  # noqa: E402

from hfs.utils.process import peak_rss_mb  # noqa: E402

log = logging.getLogger("index_build")


def gaussian_chunks(classes: int, dim: int, chunk: int = 65536, seed: int = 0) -> Iterator[tuple[int, np.ndarray]]:
    rng = np.random.default_rng(seed)
    for start in range(0, classes, chunk):
        yield start, rng.standard_normal((min(chunk, classes - start), dim), dtype=np.float32)


def build_once(name: str, classes: int, dim: int, trees: int, probe_batch: int = 256, k: int = 9) -> dict[str, Any]:
    """Build one index over ``classes`` gaussian rows; time it, and time one query batch."""
    from hfs.config import SamplerConfig
    from hfs.samplers import build_sampler

    rss0 = peak_rss_mb()
    sampler = build_sampler(name, SamplerConfig(annoy_trees=trees), "cosine")
    t0 = time.perf_counter()
    sampler.rebuild(gaussian_chunks(classes, dim), classes, dim)
    build_s = time.perf_counter() - t0
    queries = np.random.default_rng(1).standard_normal((probe_batch, dim), dtype=np.float32)
    t0 = time.perf_counter()
    sampler.candidates(queries, k)
    query_s = time.perf_counter() - t0
    sampler.close()
    return {"sampler": name, "classes": classes, "dim": dim, "trees": trees if name == "annoy" else None,
            "build_s": build_s, "query_ms_per_batch": 1e3 * query_s, "peak_rss_mb": peak_rss_mb(),
            "rss_before_mb": rss0}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = script_parser(__doc__)
    p.add_argument("--classes", type=int, nargs="+", default=[1_000_000], help="class counts C")
    p.add_argument("--dim", type=int, default=128, help="embedding size D")
    p.add_argument("--sampler", default="annoy", help="sampler whose index is built (annoy, hnsw, exact)")
    p.add_argument("--annoy-trees", type=int, default=2, help="annoy trees")
    p.add_argument("--out", default="docs/results/index_build.json", help="JSON results file")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    context = start_run(args)
    record_each(args.out, context, (build_in_fresh_process(args, classes) for classes in args.classes))


def build_in_fresh_process(args: argparse.Namespace, classes: int) -> dict[str, Any]:
    """:func:`build_once` for ``classes`` rows in a spawned process (its peak RSS is the build's alone)."""
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        row = pool.submit(build_once, args.sampler, classes, args.dim, args.annoy_trees).result()
    log.info("%s", row)
    return row


if __name__ == "__main__":
    main()
