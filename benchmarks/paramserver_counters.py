"""CPU time and minor page faults per get+push step: in-process store, `hfs serve-params`, seed's server.

    PYTHONPATH=. python benchmarks/paramserver_counters.py --steps 400 --out docs/results/paramserver_counters.json

Wall-clock rates on a shared, loaded machine say more about the neighbours than about the
code; the CPU seconds a step costs each process (from /proc, all threads) and the page faults
it takes are far steadier. The traffic is `hfs bench-paramserver`'s (1,000 random rows of a
100K x 256 matrix, get(step) then push, 16 row sets cycled). For each path: client and server
CPU ms per step, minor faults per step, and the (indicative) wall-clock rate. Linux only.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from evidence_common import run_context, write_results  # noqa: E402

from hfs.utils.process import kill_if_running, start_serve_params  # noqa: E402

log = logging.getLogger("paramserver_counters")


def proc_counters(pid: int | str = "self") -> tuple[float, int]:
    """(CPU seconds of all threads, minor page faults) of a process so far, from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    # after "pid (comm)": state=0 ... minflt=7, utime=11, stime=12
    return (int(fields[11]) + int(fields[12])) / ticks, int(fields[7])


def _measure(step: Callable[[int], None], steps: int, server_pid: int | None) -> dict[str, float]:
    """Run ``step(k)`` ``steps`` times; per-step CPU and faults of this process and the server."""
    client0, server0 = proc_counters(), proc_counters(server_pid) if server_pid else (0.0, 0)
    start = time.perf_counter()
    for k in range(steps):
        step(k)
    wall = time.perf_counter() - start
    client1, server1 = proc_counters(), proc_counters(server_pid) if server_pid else (0.0, 0)
    out = {"steps": steps, "rate_per_s": steps / wall,
           "client_cpu_ms": 1e3 * (client1[0] - client0[0]) / steps,
           "client_minflt": (client1[1] - client0[1]) / steps}
    if server_pid:
        out.update(server_cpu_ms=1e3 * (server1[0] - server0[0]) / steps,
                   server_minflt=(server1[1] - server0[1]) / steps)
    return out


def _warm_up(step: Callable[[int], None], count: int) -> None:
    for k in range(count):
        step(k)


def _store_steps(store, cfg, first: int) -> Callable[[int], None]:
    from hfs.bench.paramserver import step_data

    row_sets, grads = step_data(cfg)

    def step(k: int) -> None:
        rows = row_sets[k % len(row_sets)]
        store.get_rows("fc", rows, step=first + k)
        store.push_grads("fc", rows, grads, first + k)
    return step


def inprocess(cfg, steps: int, warmup: int) -> dict[str, float]:
    from hfs.bench.paramserver import prepare_matrix
    from hfs.paramserver.store import InProcessStore

    store = InProcessStore()
    prepare_matrix(store, cfg)
    _warm_up(_store_steps(store, cfg, 0), warmup)
    return _measure(_store_steps(store, cfg, warmup), steps, None)


def served(cfg, steps: int, warmup: int) -> dict[str, float]:
    from hfs.bench.paramserver import prepare_matrix
    from hfs.paramserver.client import ParamClient

    with tempfile.TemporaryDirectory(prefix="hfs-ps-counters-") as tmp:
        proc, address = start_serve_params(tmp)
        try:
            with ParamClient(address, timeout_s=60, connect_timeout_s=60) as client:
                prepare_matrix(client, cfg)
                _warm_up(_store_steps(client, cfg, 0), warmup)
                result = _measure(_store_steps(client, cfg, warmup), steps, proc.pid)
                client.shutdown()
            proc.wait(60)
        finally:
            kill_if_running(proc)
    return result


def seed(cfg, steps: int, warmup: int) -> dict[str, float]:
    from hfs.bench.paramserver import seed_server_client, step_data

    row_sets, grads = step_data(cfg)
    with seed_server_client(cfg) as (client, server_pid):
        def step(k: int) -> None:
            rows = row_sets[k % len(row_sets)]
            client.get_value_by_rows("fc", rows)
            client.update_by_rows("fc", rows, grads)
            if k == steps - 1:  # (warm-up has fewer steps) the last fire-and-forget push is applied
                client.get_value_by_rows("fc", rows[:1])

        _warm_up(step, warmup)
        return _measure(step, steps, server_pid)


def run(steps: int, warmup: int, rules: list[str], cfg=None) -> dict[str, Any]:
    """Every path's counters; ``cfg`` (a BenchConfig) sets rows, dim and C (default: the bench's)."""
    from hfs.bench.paramserver import BenchConfig

    cfg = BenchConfig() if cfg is None else cfg
    results: dict[str, Any] = {"rows": cfg.rows, "dim": cfg.dim, "num_classes": cfg.num_classes, "paths": {}}
    for rule in rules:
        ruled = replace(cfg, update_rule=rule)
        results["paths"][f"inprocess_{rule}"] = inprocess(ruled, steps, warmup)
        results["paths"][f"served_{rule}"] = served(ruled, steps, warmup)
    results["paths"]["seed_lazy"] = seed(cfg, steps, warmup)
    return results


def markdown(results: dict[str, Any]) -> str:
    lines = ["| path | client CPU ms/step | server CPU ms/step | client faults/step | server faults/step | "
             "rate/s (indicative) |", "|---|---|---|---|---|---|"]
    for name, r in results["paths"].items():
        server_cpu = f"{r['server_cpu_ms']:.2f}" if "server_cpu_ms" in r else "-"
        server_flt = f"{r['server_minflt']:.0f}" if "server_minflt" in r else "-"
        lines.append(f"| {name} | {r['client_cpu_ms']:.2f} | {server_cpu} | {r['client_minflt']:.0f} | {server_flt} | "
                     f"{r['rate_per_s']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=400, help="timed get+push steps per path")
    p.add_argument("--warmup", type=int, default=32, help="untimed steps first (momentum pages, caches)")
    p.add_argument("--rules", nargs="+", default=["catchup", "lazy"], help="update rules of our store to count")
    p.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    context = run_context()
    results = run(args.steps, args.warmup, args.rules)
    print(markdown(results))
    if args.out:
        write_results(args.out, context, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
