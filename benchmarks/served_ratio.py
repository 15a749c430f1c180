"""Served / in-process get+push rate, measured in interleaved rounds (robust to a box whose speed drifts).

    PYTHONPATH=. python benchmarks/served_ratio.py --rounds 15 --seconds 1 \
        --out docs/results/served_ratio.json

The interleaved measurement of `hfs bench-paramserver` (``hfs.bench.paramserver.interleaved_rates``)
on its own, with more rounds and a shard count: every round times the in-process store, then
`hfs serve-params` over shared memory with pipelined pushes, then the same with every push
waiting for its reply, each for ``--seconds`` with the same traffic (C = 100K, D = 256, 1,000
rows, catchup rule); the ratios are taken within each round and reported as median and
quartiles over rounds.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from evidence_common import script_parser, start_run, write_results  # noqa: E402

log = logging.getLogger("served_ratio")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = script_parser(__doc__)
    p.add_argument("--rounds", type=int, default=15, help="interleaved rounds (every path once per round)")
    p.add_argument("--seconds", type=float, default=1.0, help="seconds per path per round")
    p.add_argument("--rows", type=int, default=1000, help="rows per get/push")
    p.add_argument("--dim", type=int, default=256, help="columns D")
    p.add_argument("--num-classes", type=int, default=100_000, help="rows of the matrix C")
    p.add_argument("--shards", type=int, default=1, help="shard processes of `hfs serve-params` (paramserver.shards)")
    p.add_argument("--out", default="docs/results/served_ratio.json", help="JSON results")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from hfs.bench.paramserver import BenchConfig, interleaved_rates

    args = parse_args(argv)
    context = start_run(args)
    if args.rounds < 1 or args.seconds <= 0 or args.shards < 1:
        raise SystemExit("error: --rounds and --shards must be >= 1 and --seconds > 0")
    cfg = BenchConfig(rows=args.rows, dim=args.dim, num_classes=args.num_classes, rounds=args.rounds,
                      round_seconds=args.seconds)
    result = interleaved_rates(cfg, args.shards)
    write_results(args.out, context, [result])
    summary = result["over_inprocess"]
    log.info("served / in-process, median [q1-q3] over %d rounds: pipelined %.3f [%.3f-%.3f], waiting %.3f; "
             "pipelined / waiting %.3f", args.rounds, summary["shm_pipelined"]["median"], summary["shm_pipelined"]["q1"],
             summary["shm_pipelined"]["q3"], summary["shm_waiting"]["median"], result["pipelined_over_waiting"]["median"])
    return result


if __name__ == "__main__":
    main()
