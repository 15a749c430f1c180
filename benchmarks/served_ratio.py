"""Served / in-process get+push rate, measured in interleaved rounds (robust to a box whose speed drifts).

    PYTHONPATH=. python benchmarks/served_ratio.py --rounds 15 --seconds 1 \
        --out docs/results/served_ratio.json

`hfs bench-paramserver` times each path once, one after the other, for a few seconds; on a
virtual machine whose speed drifts over tens of seconds that makes its ratios swing (0.46 to
0.72 for the same code within ten minutes). Here every round times the in-process store, then
`hfs serve-params` over shared memory with pipelined pushes, then the same with every push
waiting for its reply, each for ``--seconds`` with the same traffic as `hfs bench-paramserver`
(C = 100K, D = 256, 1,000 rows, catchup rule); the ratios are taken within each round and
reported as median and quartiles over rounds.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from evidence_common import run_context, write_results  # noqa: E402

log = logging.getLogger("served_ratio")

PATHS = ("inprocess", "shm_pipelined", "shm_waiting")


def quartiles(values: list[float]) -> dict[str, float]:
    """Median and quartiles (the two middle values' mean where a quartile falls between them)."""
    if len(values) < 2:
        return {"median": values[0], "q1": values[0], "q3": values[0]}
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return {"median": median, "q1": q1, "q3": q3}


def measure(rounds: int, cfg, shards: int = 1) -> dict[str, Any]:
    """Per-round rates of every path and the per-round ratios to in-process."""
    from hfs.bench.paramserver import prepare_matrix, round_trips_per_second, start_server
    from hfs.paramserver.client import ParamClient
    from hfs.paramserver.store import InProcessStore
    from hfs.utils.process import kill_if_running

    rates: dict[str, list[float]] = {p: [] for p in PATHS}
    with tempfile.TemporaryDirectory() as scratch:
        proc, address = start_server(Path(scratch), shards)
        local = InProcessStore()
        clients = {"shm_pipelined": ParamClient(address, timeout_s=60, connect_timeout_s=60, shared_memory="auto"),
                   "shm_waiting": ParamClient(address, timeout_s=60, connect_timeout_s=60, shared_memory="auto",
                                              pipeline_pushes=False)}
        try:
            stores = {"inprocess": local, **clients}
            for path, store in stores.items():
                prepare_matrix(store, cfg, path)
            steps = dict.fromkeys(PATHS, 0)
            for r in range(rounds):
                for path in PATHS:
                    rate, steps[path] = round_trips_per_second(stores[path], cfg, steps[path], name=path)
                    rates[path].append(rate)
                log.info("round %d: %s", r, {p: round(v[-1]) for p, v in rates.items()})
            used = all(s["server"].get("shm_bytes_in", 0) > 0 for s in clients["shm_pipelined"].server_stats())
            clients["shm_pipelined"].shutdown()
            proc.wait(60)  # an orderly exit; kill_if_running below if it did not come
        finally:
            for client in clients.values():
                client.close()
            local.close()
            kill_if_running(proc)
    ratios = {p: [a / b for a, b in zip(rates[p], rates["inprocess"])] for p in PATHS[1:]}
    pipelined_over_waiting = [a / b for a, b in zip(rates["shm_pipelined"], rates["shm_waiting"])]
    return {"shm_used": used, "rates": rates, "rate_summary": {p: quartiles(v) for p, v in rates.items()},
            "over_inprocess": {p: quartiles(v) for p, v in ratios.items()},
            "pipelined_over_waiting": quartiles(pipelined_over_waiting), "per_round_over_inprocess": ratios}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=15, help="interleaved rounds (every path once per round)")
    p.add_argument("--seconds", type=float, default=1.0, help="seconds per path per round")
    p.add_argument("--rows", type=int, default=1000, help="rows per get/push")
    p.add_argument("--dim", type=int, default=256, help="columns D")
    p.add_argument("--num-classes", type=int, default=100_000, help="rows of the matrix C")
    p.add_argument("--shards", type=int, default=1, help="shard processes of `hfs serve-params` (paramserver.shards)")
    p.add_argument("--out", default="docs/results/served_ratio.json", help="JSON results")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from hfs.bench.paramserver import BenchConfig

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args = parse_args(argv)
    if args.rounds < 1 or args.seconds <= 0 or args.shards < 1:
        raise SystemExit("error: --rounds and --shards must be >= 1 and --seconds > 0")
    cfg = BenchConfig(rows=args.rows, dim=args.dim, num_classes=args.num_classes, seconds=args.seconds)
    result = measure(args.rounds, cfg, args.shards)
    write_results(args.out, {**run_context(), "args": vars(args)}, [result])
    summary = result["over_inprocess"]
    log.info("served / in-process, median [q1-q3] over %d rounds: pipelined %.3f [%.3f-%.3f], waiting %.3f; "
             "pipelined / waiting %.3f", args.rounds, summary["shm_pipelined"]["median"], summary["shm_pipelined"]["q1"],
             summary["shm_pipelined"]["q3"], summary["shm_waiting"]["median"], result["pipelined_over_waiting"]["median"])
    return result


if __name__ == "__main__":
    main()
