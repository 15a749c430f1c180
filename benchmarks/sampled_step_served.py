"""The sampled classifier-layer step against `hfs serve-params`, with the index where the code puts it.

    PYTHONPATH=. python benchmarks/sampled_step_served.py --classes 1000000 --dim 256 \
        --batch 256 --sample-num 1000 --sampler annoy --steps 30 --out docs/results/sampled_step_1m.json

A server process holds the C x D matrix; this process runs `hfs.bench.fc.time_sampled_steps`
(SampledFC from the trainer's own factories, the same call `hfs bench-fc` times) through the
loopback client, after the first index is ready. It records the median step with its parts,
the index build time, the trainer's peak RSS and the server's RSS.

The script uses only `time_sampled_steps`, so it runs against any commit that has it: run it
with PYTHONPATH pointing at an older tree (where the trainer built and held the index itself)
and at this one, one after the other, to compare the two designs on the same box
(``--label`` names each in the JSON).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from evidence_common import console_logging, run_context, write_results  # noqa: E402
from scale_10m import start_server  # noqa: E402

from hfs.utils.process import peak_rss_mb, rss_mb  # noqa: E402

log = logging.getLogger("sampled_step_served")


def bench_config(args: argparse.Namespace, address: str):
    from hfs.config import config_from_dict

    return config_from_dict({
        "model": {"embedding_size": args.dim},
        "fc": {"mode": "sampled", "sample_num": args.sample_num, "num_classes": args.classes},
        "sampler": {"type": args.sampler, "annoy_trees": args.annoy_trees},
        "paramserver": {"address": address, "timeout_s": 1800.0, "connect_timeout_s": 120.0},
        "train": {"batch_size": args.batch, "seed": 0},
    })


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    from hfs.bench.fc import time_sampled_steps

    server, address = start_server(workdir / "store", workdir / "server.log", hugepages=False)
    server_rss: list[float] = []
    try:
        cfg = bench_config(args, address)
        t0 = time.perf_counter()
        out = time_sampled_steps(cfg, args.classes, args.batch, args.sample_num, args.steps, warmup=args.warmup,
                                 wait_index=True, on_step=lambda: server_rss.append(rss_mb(pid=server.pid)))
        wall = time.perf_counter() - t0
    finally:
        server.terminate()
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
    times = sorted(out["times"])
    steps = len(times)
    return {
        "label": args.label,
        "median_step_ms": 1e3 * statistics.median(times),
        "p10_p90_step_ms": [1e3 * times[steps // 10], 1e3 * times[min(steps - 1, (9 * steps) // 10)]],
        "parts_ms_per_step": {k: 1e3 * v / steps for k, v in out["timers"].items()},
        "index_build_s": out["build_s"],
        "trainer_peak_rss_mb": peak_rss_mb(),
        "server_rss_mb_max": max(server_rss) if server_rss else None,
        "upkeep": {k: v for k, v in out.get("upkeep", {}).items() if isinstance(v, (int, float, bool))},
        "wall_s": wall,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classes", type=int, default=1_000_000, help="classes C held by the server")
    p.add_argument("--dim", type=int, default=256, help="embedding size D")
    p.add_argument("--batch", type=int, default=256, help="batch size B")
    p.add_argument("--sample-num", type=int, default=1000, help="active classes S")
    p.add_argument("--sampler", default="annoy", help="sampler type")
    p.add_argument("--annoy-trees", type=int, default=16, help="annoy trees")
    p.add_argument("--steps", type=int, default=30, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads of this process (0 = torch's default)")
    p.add_argument("--label", default="", help="name of this run in the JSON (e.g. the design or commit)")
    p.add_argument("--out", default="docs/results/sampled_step_served.json", help="JSON results (a run is appended)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    console_logging()
    args = parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="hfs-step-served-") as tmp:
        result = run(args, Path(tmp))
    log.info("%s: median step %.1f ms, trainer peak RSS %.0f MiB, server RSS %.0f MiB", args.label,
             result["median_step_ms"], result["trainer_peak_rss_mb"], result["server_rss_mb_max"] or -1)
    out = Path(args.out)
    earlier = json.loads(out.read_text())["results"] if out.exists() else []
    write_results(out, run_context(), earlier + [result])


if __name__ == "__main__":
    main()
