"""`hfs bench-paramserver`: the store in process vs over loopback vs the seed's server, sync-step cost, memory.

Every number is measured in the same run so the ratios hold on a noisy shared machine:

* round trips/s of one sampled step (get rows for step t, push their gradients) through the
  in-process store (the limit; catchup and lazy rule, the configured row kernel and the numpy
  one, in interleaved rounds), through a `hfs serve-params` process on 127.0.0.1 (both under
  the catchup and the lazy rule; arrays as ZeroMQ frames, and again through the same-host
  shared-memory segment, with pushes pipelined and, once, each waiting for its reply), and
  through the seed project's server logic, reimplemented
  for comparison in `hfs.bench.seed_paramserver` (fire-and-forget pushes, per-row merge);
* rows/s of in-process get + push at 1,000, 10,000 and 100,000 rows a call, set against the
  memory bandwidth of one large ``np.copyto`` timed in the same run (the physical limit);
* mean latency of a synchronous step (push, then get for the next step) with 1 worker and
  with N workers (processes, one client each) on the same server;
* resident memory of a fresh process after creating a C x D matrix.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from typing import Any, Iterator

import numpy as np

from hfs.paramserver.base import HParams, WeightStore
from hfs.utils.errors import HfsError
from hfs.utils.process import free_port, kill_if_running, memory_status_mb, rss_mb, start_serve_params

log = logging.getLogger(__name__)

#: update rules whose in-process rate every run measures (dense is O(C x D) per step: not timed)
UPDATE_RULES_TIMED = ("catchup", "lazy")


@dataclass
class BenchConfig:
    rows: int = 1000
    dim: int = 256
    num_classes: int = 100_000
    seconds: float = 3.0
    workers: int = 4
    sync_steps: int = 100
    memory_rows: int = 2_000_000
    memory_dim: int = 128
    update_rule: str = "catchup"
    rounds: int = 5
    round_seconds: float = 1.0
    kernel: str = "auto"
    scaling_rows: tuple[int, ...] = (1000, 10_000, 100_000)
    bandwidth_mib: int = 512


def _row_sets(cfg: BenchConfig, count: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.choice(cfg.num_classes, cfg.rows, replace=False).astype(np.int64) for _ in range(count)]


#: the benchmark's optimiser settings (lr, momentum, weight decay), the same for every server
BENCH_HPARAMS = HParams(0.01, 0.9, 5e-4)


def kernel_flag(cfg: BenchConfig) -> tuple[str, ...]:
    """The `hfs serve-params` flags that give the benchmark's server the configured row kernel."""
    return ("--set", f"paramserver.kernel={cfg.kernel}")


def prepare_matrix(store: WeightStore, cfg: BenchConfig, name: str = "fc") -> None:
    store.create(name, cfg.num_classes, cfg.dim, init="gaussian", std=0.01, seed=0, exist_ok=True,
                 update_rule=cfg.update_rule)
    store.set_hparams(name, BENCH_HPARAMS)


def step_data(cfg: BenchConfig) -> tuple[list[np.ndarray], np.ndarray]:
    """16 row sets (cycled) and one gradient block: the same traffic for every server."""
    grads = np.random.default_rng(2).standard_normal((cfg.rows, cfg.dim)).astype(np.float32) * 1e-3
    return _row_sets(cfg, 16, seed=1), grads


def round_trips_per_second(store: WeightStore, cfg: BenchConfig, first_step: int = 0,
                           name: str = "fc") -> tuple[float, int]:
    """get(step) + push of cfg.rows rows, repeated for cfg.seconds; returns (rate, next step)."""
    row_sets, grads = step_data(cfg)
    for i, rows in enumerate(row_sets):  # warm-up: first touches of momentum pages are not the steady state
        store.get_rows(name, rows, step=first_step + i)
        store.push_grads(name, rows, grads, first_step + i)
    step = first_step + len(row_sets)
    done = 0
    start = time.perf_counter()
    while time.perf_counter() - start < cfg.seconds:
        rows = row_sets[done % len(row_sets)]
        store.get_rows(name, rows, step=step)
        store.push_grads(name, rows, grads, step)
        step += 1
        done += 1
    return done / (time.perf_counter() - start), step


@contextlib.contextmanager
def seed_server_client(cfg: BenchConfig) -> Iterator[tuple[Any, int]]:
    """A client of a running seed-style server (its own process on 127.0.0.1, pid given too) with
    matrix ``fc`` and the bench's hyper-parameters; the server is stopped (killed if need be) on exit."""
    from hfs.bench.seed_paramserver import SeedStyleClient

    proc, address = start_seed_server()
    client = SeedStyleClient(address)
    try:
        client.add_matrix("fc", (cfg.num_classes, cfg.dim))
        client.update_params(lr=BENCH_HPARAMS.lr, momentum=BENCH_HPARAMS.momentum,
                             weight_decay=BENCH_HPARAMS.weight_decay)
        yield client, proc.pid
        client.stop_server()
        proc.wait(60)
    finally:
        client.close()
        kill_if_running(proc)


def seed_round_trips_per_second(cfg: BenchConfig) -> float:
    """The same get + push traffic against the seed project's server logic (reimplemented in
    :mod:`hfs.bench.seed_paramserver`), in its own process on 127.0.0.1. Its pushes are
    fire-and-forget, so one last read after the clock's end waits for the queued ones."""
    with seed_server_client(cfg) as (client, _):
        row_sets, grads = step_data(cfg)
        for rows in row_sets:
            client.get_value_by_rows("fc", rows)
            client.update_by_rows("fc", rows, grads)
        done = 0
        start = time.perf_counter()
        while time.perf_counter() - start < cfg.seconds:
            rows = row_sets[done % len(row_sets)]
            client.get_value_by_rows("fc", rows)
            client.update_by_rows("fc", rows, grads)
            done += 1
        client.get_value_by_rows("fc", row_sets[0][:1])  # every queued push is applied
        return done / (time.perf_counter() - start)


def _sync_worker(address: str, cfg: BenchConfig, index: int, name: str, first_step: int, barrier, results) -> None:
    """One worker process: register, run cfg.sync_steps synchronous steps, report mean seconds/step."""
    from hfs.paramserver.client import ParamClient

    try:
        with ParamClient(address, timeout_s=120) as client:
            client.register(name)
            row_sets = _row_sets(cfg, 8, seed=10 + index)
            grads = np.full((cfg.rows, cfg.dim), 1e-4, np.float32)
            barrier.wait()
            start = time.perf_counter()
            for k in range(cfg.sync_steps):
                step = first_step + k
                client.push_grads("fc", row_sets[k % 8], grads, step)
                client.get_rows("fc", row_sets[(k + 1) % 8], step=step + 1)
            results.put((index, (time.perf_counter() - start) / cfg.sync_steps, None))
            client.leave(name)
    except BaseException as exc:  # reported by the parent
        barrier.abort()
        results.put((index, None, f"{exc.__class__.__name__}: {exc}"))


def sync_step_latency(address: str, cfg: BenchConfig, workers: int, first_step: int, tag: str) -> float:
    """Mean seconds per synchronous step over ``workers`` worker processes (one client each).

    Each worker pushes its own cfg.rows rows and reads cfg.rows rows for the next step, so
    the server sums ``workers`` pushes per step, as with `hfs train-dist` ranks.
    """
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(workers)
    results = ctx.Queue()
    procs = [ctx.Process(target=_sync_worker, args=(address, cfg, i, f"{tag}-w{i}", first_step, barrier, results))
             for i in range(workers)]
    for proc in procs:
        proc.start()
    got = [results.get(timeout=600) for _ in procs]
    for proc in procs:
        proc.join(60)
    failures = [err for _, _, err in got if err]
    if failures:
        raise HfsError(f"a benchmark worker failed: {failures[0]}")
    return float(np.mean([latency for _, latency, _ in got]))


def _memory_child(rows: int, dim: int) -> dict[str, int]:
    from hfs.paramserver.store import InProcessStore

    base = rss_mb("VmRSS")
    store = InProcessStore()
    store.create("fc", rows, dim, init="gaussian", seed=0)
    after = memory_status_mb()
    return {"baseline_rss": base, "rss_after_create": after["VmRSS"], "peak_rss": after["VmHWM"]}


def store_memory(rows: int, dim: int) -> dict[str, float]:
    """RSS of a fresh process that creates a rows x dim matrix (momentum mapped, untouched)."""
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1) as pool:
        got = pool.apply(_memory_child, (rows, dim))
    weights = rows * dim * 4
    return {"rows": rows, "dim": dim, "weights_gib": weights / 2**30,
            "bound_gib": 2 * weights / 2**30,  # weights + momentum once every row was updated
            "rss_gib": (got["rss_after_create"] - got["baseline_rss"]) / 2**10,
            "peak_gib": (got["peak_rss"] - got["baseline_rss"]) / 2**10}


def start_seed_server() -> tuple[subprocess.Popen, str]:
    """A seed-style server process (:mod:`hfs.bench.seed_paramserver`) on a free loopback port."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "hfs.bench.seed_paramserver", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ))
    return proc, f"tcp://127.0.0.1:{port}"


def shared_memory_round_trips(address: str, cfg: BenchConfig) -> dict:
    """The loopback round trips again through a client whose arrays go through shared memory
    (fresh matrices ``shm_<rule>``, so both paths start from the same state); whether the
    server really took the segment is recorded with the rates."""
    from hfs.paramserver.client import ParamClient

    rates = {}
    with ParamClient(address, timeout_s=60, connect_timeout_s=60, shared_memory="auto") as client:
        for rule in dict.fromkeys((cfg.update_rule, *UPDATE_RULES_TIMED)):
            prepare_matrix(client, replace(cfg, update_rule=rule), f"shm_{rule}")
            rates[rule], _ = round_trips_per_second(client, cfg, name=f"shm_{rule}")
        used = client.server_stats()[0]["server"].get("shm_bytes_in", 0) > 0
    # the same again with every push waiting for its reply (paramserver.pipeline_pushes: false)
    with ParamClient(address, timeout_s=60, connect_timeout_s=60, shared_memory="auto",
                     pipeline_pushes=False) as client:
        prepare_matrix(client, cfg, f"shm_wait_{cfg.update_rule}")
        waiting, _ = round_trips_per_second(client, cfg, name=f"shm_wait_{cfg.update_rule}")
    if not used:
        log.warning("the benchmark's server did not take the shared-memory segment: the shared-memory rows "
                    "measured ZeroMQ frames")
    return {"loopback_shm_rt_per_s_by_rule": rates, "loopback_shm_used": used,
            "loopback_shm_waiting_rt_per_s": waiting,
            "loopback_shm_pipelined_over_waiting": rates[cfg.update_rule] / waiting}


#: the served paths an interleaved round times after the in-process ones (see interleaved_rates)
SERVED_PATHS = ("shm_pipelined", "shm_waiting")


def quartiles(values: list[float]) -> dict[str, float]:
    """Median and quartiles (the two middle values' mean where a quartile falls between them)."""
    if len(values) < 2:
        return {"median": values[0], "q1": values[0], "q3": values[0]}
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return {"median": median, "q1": q1, "q3": q3}


def inprocess_paths(cfg: BenchConfig, kernel: str) -> dict[str, tuple[str, str]]:
    """The in-process paths of an interleaved round: name -> (update rule, row kernel).

    ``inprocess`` is the configured rule on the configured kernel (``kernel``, resolved), the
    served paths' reference; the others pair every timed rule with that kernel and with numpy's
    (the fallback: the vectorised code the fused kernel replaces).
    """
    paths = {"inprocess": (cfg.update_rule, kernel)}
    for rule in UPDATE_RULES_TIMED:
        for name in dict.fromkeys((kernel, "numpy")):
            if (rule, name) != paths["inprocess"]:
                paths[f"inprocess_{rule}_{name}"] = (rule, name)
    return paths


def _per_round(rates: dict[str, list[float]], paths: dict[str, tuple[str, str]], top: tuple[str, str],
               bottom: tuple[str, str]) -> list[float]:
    """Round by round, the rate of in-process path ``top`` (rule, kernel) over ``bottom``'s."""
    by_key = {key: rates[name] for name, key in paths.items()}
    return [a / b for a, b in zip(by_key[top], by_key[bottom])]


def interleaved_rates(cfg: BenchConfig, shards: int = 1) -> dict[str, Any]:
    """In-process and served rates in ``cfg.rounds`` interleaved rounds, robust to a machine whose speed drifts.

    Timing each path once, one after the other, lets a drift of the machine's speed between
    them move the ratio (0.46 to 0.72 for the same code within ten minutes on a 2-core VM).
    Here every round times the in-process store under each rule and row kernel
    (:func:`inprocess_paths`), then `hfs serve-params` (``shards`` shard processes) over shared
    memory with pipelined pushes, then the same with every push waiting for its reply,
    ``cfg.round_seconds`` each with the same traffic, and the ratios are taken within each
    round: their median and quartiles over rounds. catchup / lazy is on the configured kernel;
    kernel / numpy per rule where the configured kernel is not numpy.
    """
    from hfs.paramserver.kernels import load_kernel

    timed = replace(cfg, seconds=cfg.round_seconds)
    kernel = load_kernel(cfg.kernel).name
    local_paths = inprocess_paths(cfg, kernel)
    with interleaved_stores(cfg, local_paths, shards) as (stores, served):
        for path, store in stores.items():
            rule = local_paths[path][0] if path in local_paths else cfg.update_rule
            prepare_matrix(store, replace(timed, update_rule=rule), path)
        rates = time_rounds(stores, timed, cfg.rounds)
        used = all(s["server"].get("shm_bytes_in", 0) > 0 for s in served.server_stats())
        server_kernel = served.server_stats()[0]["store"]["kernel"]
    return {"rounds": cfg.rounds, "shards": shards, "shm_used": used, "kernel": kernel, "server_kernel": server_kernel,
            "paths": {name: {"update_rule": rule, "kernel": k} for name, (rule, k) in local_paths.items()},
            **round_ratios(rates, local_paths, kernel)}


@contextlib.contextmanager
def interleaved_stores(cfg: BenchConfig, local_paths: dict[str, tuple[str, str]], shards: int
                       ) -> Iterator[tuple[dict[str, WeightStore], Any]]:
    """({path: store} in timing order: an in-process store per ``local_paths`` entry, then a client per
    :data:`SERVED_PATHS` of a fresh `hfs serve-params` of ``shards`` shards; the pipelined client).
    On exit the server is shut down (killed if it does not stop) and every store closed."""
    from hfs.paramserver.client import ParamClient
    from hfs.paramserver.store import InProcessStore

    with tempfile.TemporaryDirectory(prefix="hfs-bench-ps-") as scratch:
        proc, address = start_serve_params(scratch, shards=shards, args=kernel_flag(cfg))
        locals_ = {name: InProcessStore(kernel=k) for name, (_, k) in local_paths.items()}
        clients = {path: ParamClient(address, timeout_s=60, connect_timeout_s=60, shared_memory="auto",
                                     pipeline_pushes=path == "shm_pipelined") for path in SERVED_PATHS}
        try:
            yield {**locals_, **clients}, clients["shm_pipelined"]
            clients["shm_pipelined"].shutdown()
            proc.wait(60)  # an orderly exit; kill_if_running below if it did not come
        finally:
            for store in (*clients.values(), *locals_.values()):
                store.close()
            kill_if_running(proc)


def time_rounds(stores: dict[str, WeightStore], timed: BenchConfig, rounds: int) -> dict[str, list[float]]:
    """Per path, its round trips/s in each of ``rounds`` rounds; a round times every store in turn
    (``timed.seconds`` each, matrix named after its path), so a drift of the machine hits all alike."""
    rates: dict[str, list[float]] = {path: [] for path in stores}
    steps = dict.fromkeys(stores, 0)
    for r in range(rounds):
        for path, store in stores.items():
            rate, steps[path] = round_trips_per_second(store, timed, steps[path], name=path)
            rates[path].append(rate)
        log.info("round %d: %s", r, {p: round(v[-1]) for p, v in rates.items()})
    return rates


def round_ratios(rates: dict[str, list[float]], local_paths: dict[str, tuple[str, str]], kernel: str
                 ) -> dict[str, Any]:
    """The rates and their round-by-round ratios (each path over ``inprocess``, pipelined over waiting
    pushes, catchup over lazy, ``kernel`` over numpy per rule), with median and quartiles of each."""
    ratios = {p: [a / b for a, b in zip(v, rates["inprocess"])] for p, v in rates.items() if p != "inprocess"}
    pipelined_over_waiting = [a / b for a, b in zip(rates["shm_pipelined"], rates["shm_waiting"])]
    catchup_over_lazy = _per_round(rates, local_paths, ("catchup", kernel), ("lazy", kernel))
    kernel_over_numpy = {rule: _per_round(rates, local_paths, (rule, kernel), (rule, "numpy"))
                         for rule in UPDATE_RULES_TIMED if kernel != "numpy"}
    return {"rates": rates, "rate_summary": {p: quartiles(v) for p, v in rates.items()},
            "over_inprocess": {p: quartiles(v) for p, v in ratios.items()},
            "pipelined_over_waiting": quartiles(pipelined_over_waiting), "per_round_over_inprocess": ratios,
            "catchup_over_lazy": quartiles(catchup_over_lazy), "per_round_catchup_over_lazy": catchup_over_lazy,
            "kernel_over_numpy": {rule: quartiles(v) for rule, v in kernel_over_numpy.items()},
            "per_round_kernel_over_numpy": kernel_over_numpy}


#: Row vectors (dim float32 each) a catchup get + push moves per row at the least: the get reads
#: weight and momentum and writes the answer (3; it writes nothing back), the push reads the
#: gradient, weight and momentum and writes weight and momentum (5).
ROW_VECTORS_PER_ROUND_TRIP = 8


def copy_bandwidth(mib: int, repeats: int = 5) -> float:
    """Bytes per second (read + written) of the best of ``repeats`` ``np.copyto`` of ``mib`` MiB:
    this machine's memory bandwidth for one thread streaming through RAM, the store's physical limit."""
    src = np.ones(int(mib) << 18, dtype=np.float32)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # the pages faulted in before the clock starts
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.nbytes / best


def rows_per_second(cfg: BenchConfig, bandwidth: float) -> list[dict[str, float]]:
    """In-process get + push of each ``cfg.scaling_rows`` rows a call (configured rule and kernel),
    ``cfg.seconds`` each: rows per second, the bytes they move (ROW_VECTORS_PER_ROUND_TRIP per row)
    and that as a share of ``bandwidth``. Sizes above the matrix's rows are left out."""
    from hfs.paramserver.store import InProcessStore

    points = []
    for rows in cfg.scaling_rows:
        if rows > cfg.num_classes:
            log.warning("rows/s at %d rows a call left out: the matrix has %d rows (--num-classes)", rows,
                        cfg.num_classes)
            continue
        sized = replace(cfg, rows=rows)
        store = InProcessStore(kernel=cfg.kernel)
        try:
            prepare_matrix(store, sized)
            rate, _ = round_trips_per_second(store, sized)
        finally:
            store.close()
        moved = rate * rows * ROW_VECTORS_PER_ROUND_TRIP * 4 * cfg.dim
        points.append({"rows": rows, "round_trips_per_s": rate, "rows_per_s": rate * rows, "bytes_per_s": moved,
                       "of_copy_bandwidth": moved / bandwidth})
    return points


def run_benchmark(cfg: BenchConfig, progress=None) -> dict:
    """All measurements of `hfs bench-paramserver`, as a dict (also what --out writes)."""
    from hfs.paramserver.client import ParamClient
    from hfs.paramserver.kernels import load_kernel
    from hfs.paramserver.store import InProcessStore

    task = progress.add_task("bench-paramserver", total=10, info="row kernel") if progress else None

    def advance(info: str) -> None:
        if progress:
            progress.update(task, advance=1, info=info)

    results: dict = {"config": asdict(cfg), "loadavg_start": list(os.getloadavg()), "loopback_rt_per_s_by_rule": {}}
    kernel = load_kernel(cfg.kernel)
    # the first call's compilation (or numba cache load), paid here so no timed call pays it
    results["kernel"] = {"name": kernel.name, "warm_up_s": kernel.warm_up()}
    advance(f"memory bandwidth, rows/s at {', '.join(map(str, cfg.scaling_rows))} rows")
    bandwidth = copy_bandwidth(cfg.bandwidth_mib)
    results["copy_bandwidth"] = {"mib": cfg.bandwidth_mib, "bytes_per_s": bandwidth}
    results["rows_per_s"] = rows_per_second(cfg, bandwidth)
    advance("in-process")
    # every update rule in-process, in this run (the cost of catchup over lazy, same box, same minute)
    results["inprocess_rt_per_s_by_rule"] = {}
    for rule in dict.fromkeys((cfg.update_rule, *UPDATE_RULES_TIMED)):
        local = InProcessStore(kernel=cfg.kernel)
        prepare_matrix(local, replace(cfg, update_rule=rule))
        results["inprocess_rt_per_s_by_rule"][rule], _ = round_trips_per_second(local, cfg)
        del local
    results["inprocess_rt_per_s"] = results["inprocess_rt_per_s_by_rule"][cfg.update_rule]
    advance("loopback server, shared memory")
    with tempfile.TemporaryDirectory(prefix="hfs-bench-ps-") as tmp:
        server, address = start_serve_params(tmp, args=kernel_flag(cfg))
        try:
            results.update(shared_memory_round_trips(address, cfg))
            advance("loopback server, frames")
            with ParamClient(address, timeout_s=60, connect_timeout_s=60, shared_memory="off") as client:
                by_rule, next_steps = results["loopback_rt_per_s_by_rule"], {}
                for rule in dict.fromkeys((cfg.update_rule, *UPDATE_RULES_TIMED)):
                    name = "fc" if rule == cfg.update_rule else f"fc_{rule}"  # "fc" goes on to the sync steps
                    prepare_matrix(client, replace(cfg, update_rule=rule), name)
                    by_rule[rule], next_steps[name] = round_trips_per_second(client, cfg, name=name)
                results["loopback_rt_per_s"], step = by_rule[cfg.update_rule], next_steps["fc"]
                advance("1-worker sync steps")
                results["sync_1_worker_ms"] = 1e3 * sync_step_latency(address, cfg, 1, step, "one")
                step += cfg.sync_steps
                # The same server work as N workers (N x rows pushed per step) from one worker:
                # separates the cost of synchronising from the cost of the data volume.
                wide = replace(cfg, rows=cfg.rows * cfg.workers)
                results["sync_1_worker_all_rows_ms"] = 1e3 * sync_step_latency(address, wide, 1, step, "wide")
                step += cfg.sync_steps
                advance(f"{cfg.workers}-worker sync steps")
                results[f"sync_{cfg.workers}_workers_ms"] = 1e3 * sync_step_latency(address, cfg, cfg.workers, step,
                                                                                      "many")
                client.shutdown()
            server.wait(60)
        finally:
            kill_if_running(server)
    if server.returncode not in (0, None, -9):
        raise HfsError(f"the benchmark's server exited with code {server.returncode}")
    advance(f"{cfg.rounds} interleaved rounds")
    if cfg.rounds > 0:
        results["interleaved"] = interleaved_rates(cfg)
    advance("seed-style server")
    results["seed_rt_per_s"] = seed_round_trips_per_second(cfg)
    advance(f"memory {cfg.memory_rows} x {cfg.memory_dim}")
    results["memory"] = store_memory(cfg.memory_rows, cfg.memory_dim)
    advance("done")
    results["loopback_over_inprocess"] = results["loopback_rt_per_s"] / results["inprocess_rt_per_s"]
    results["loopback_over_inprocess_by_rule"] = {
        rule: rate / results["inprocess_rt_per_s_by_rule"][rule]
        for rule, rate in results["loopback_rt_per_s_by_rule"].items()}
    results["loopback_over_seed"] = results["loopback_rt_per_s"] / results["seed_rt_per_s"]
    results["loopback_over_seed_by_rule"] = {rule: rate / results["seed_rt_per_s"]
                                             for rule, rate in results["loopback_rt_per_s_by_rule"].items()}
    shm_rates = results["loopback_shm_rt_per_s_by_rule"]
    results["loopback_shm_rt_per_s"] = shm_rates[cfg.update_rule]
    results["loopback_shm_over_inprocess_by_rule"] = {
        rule: rate / results["inprocess_rt_per_s_by_rule"][rule] for rule, rate in shm_rates.items()}
    results["loopback_shm_over_inprocess"] = results["loopback_shm_over_inprocess_by_rule"][cfg.update_rule]
    results["loopback_shm_over_seed"] = results["loopback_shm_rt_per_s"] / results["seed_rt_per_s"]
    results["loopback_shm_over_frames_by_rule"] = {
        rule: rate / results["loopback_rt_per_s_by_rule"][rule] for rule, rate in shm_rates.items()}
    results["loadavg_end"] = list(os.getloadavg())  # a loaded machine moves the rates: read them with this
    results["sync_ratio"] = results[f"sync_{cfg.workers}_workers_ms"] / results["sync_1_worker_ms"]
    results["sync_ratio_same_rows"] = results[f"sync_{cfg.workers}_workers_ms"] / results["sync_1_worker_all_rows_ms"]
    return results


def _quartile_text(q: dict[str, float]) -> str:
    from rich.markup import escape

    return escape(f"{q['median']:.2f} [{q['q1']:.2f}-{q['q3']:.2f}]")


def _render_kernel_rounds(table, inter: dict) -> None:
    """catchup / lazy and the kernel's speed-up over numpy, median [q1-q3] of the interleaved rounds."""
    from rich.markup import escape

    table.add_row(escape(f"in-process catchup / lazy, median [q1-q3] of {inter['rounds']} interleaved rounds "
                         f"({inter['kernel']} kernel)"), _quartile_text(inter["catchup_over_lazy"]), ">= 0.9")
    for rule, q in inter["kernel_over_numpy"].items():
        table.add_row(f"  in-process {rule}: {inter['kernel']} kernel / numpy kernel", _quartile_text(q),
                      ">= 1 (lazy no slower)" if rule == "lazy" else "the fused pass's gain")


def _render_rows_per_second(table, results: dict, cfg: dict) -> None:
    """rows/s of get + push per call size, against the copy bandwidth measured in the same run."""
    bandwidth = results["copy_bandwidth"]
    table.add_row(f"memory bandwidth: np.copyto of {bandwidth['mib']} MiB (read + write, GB/s)",
                  f"{bandwidth['bytes_per_s'] / 1e9:.1f}", "the physical limit")
    for point in results["rows_per_s"]:
        table.add_row(f"  in-process get+push, {point['rows']} rows a call ({cfg['update_rule']}, "
                      f"{results['kernel']['name']}): M rows/s | GB/s moved | of copy bandwidth",
                      f"{point['rows_per_s'] / 1e6:.2f} | {point['bytes_per_s'] / 1e9:.1f} | "
                      f"{point['of_copy_bandwidth']:.0%}", f"{ROW_VECTORS_PER_ROUND_TRIP} x dim x 4 bytes per row")


def render(results: dict, console) -> None:
    """The results as a rich table, with the issue's targets beside the ratios."""
    from rich.markup import escape
    from rich.table import Table

    cfg = results["config"]
    mem = results["memory"]
    table = Table(title=f"parameter server: {cfg['rows']} rows x {cfg['dim']} float32 per step, "
                        f"C = {cfg['num_classes']}")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_column("target")
    kernel = results["kernel"]
    table.add_row(f"row kernel {kernel['name']}: first call (compile or numba cache load), s",
                  f"{kernel['warm_up_s']:.2f}", "paid once per process")
    table.add_row(f"in-process get+push round trips/s ({cfg['update_rule']})", f"{results['inprocess_rt_per_s']:.0f}",
                  "the limit")
    by_rule = results["inprocess_rt_per_s_by_rule"]
    if "catchup" in by_rule and "lazy" in by_rule:
        table.add_row("in-process: catchup / lazy rule", f"{by_rule['catchup'] / by_rule['lazy']:.2f}",
                      "cost of dense SGD's numbers")
    if "interleaved" in results:
        _render_kernel_rounds(table, results["interleaved"])
    _render_rows_per_second(table, results, cfg)
    table.add_row(f"loopback get+push round trips/s ({cfg['update_rule']})", f"{results['loopback_rt_per_s']:.0f}", "")
    sequential = ">= 0.6 (timed in sequence)" if "interleaved" in results else ">= 0.6"
    table.add_row(f"loopback / in-process ({cfg['update_rule']})", f"{results['loopback_over_inprocess']:.2f}", sequential)
    for rule, ratio in results["loopback_over_inprocess_by_rule"].items():
        if rule != cfg["update_rule"]:
            table.add_row(f"loopback / in-process ({rule}: {results['loopback_rt_per_s_by_rule'][rule]:.0f} / "
                          f"{results['inprocess_rt_per_s_by_rule'][rule]:.0f})", f"{ratio:.2f}", "")
    shm_rates = results["loopback_shm_rt_per_s_by_rule"]
    via = "" if results["loopback_shm_used"] else " (NOT USED: frames)"
    table.add_row(f"loopback shared-memory get+push round trips/s ({cfg['update_rule']}){via}",
                  f"{results['loopback_shm_rt_per_s']:.0f}", "")
    table.add_row(f"shared memory / in-process ({cfg['update_rule']})", f"{results['loopback_shm_over_inprocess']:.2f}",
                  sequential)
    if "interleaved" in results:
        inter = results["interleaved"]
        ratio = inter["over_inprocess"]["shm_pipelined"]
        table.add_row(escape(f"shared memory / in-process, median [q1-q3] of {inter['rounds']} interleaved rounds "
                             f"({cfg['update_rule']})"),
                      escape(f"{ratio['median']:.2f} [{ratio['q1']:.2f}-{ratio['q3']:.2f}]"), ">= 0.6 (drift-proof)")
        table.add_row("  the same, pushes waiting for their replies",
                      f"{inter['over_inprocess']['shm_waiting']['median']:.2f}", "")
    for rule, ratio in results["loopback_shm_over_inprocess_by_rule"].items():
        if rule != cfg["update_rule"]:
            table.add_row(f"shared memory / in-process ({rule}: {shm_rates[rule]:.0f} / "
                          f"{results['inprocess_rt_per_s_by_rule'][rule]:.0f})", f"{ratio:.2f}", "")
    for rule, ratio in results["loopback_shm_over_frames_by_rule"].items():
        table.add_row(f"shared memory / frames ({rule})", f"{ratio:.2f}", "")
    if "loopback_shm_waiting_rt_per_s" in results:
        table.add_row(f"shared memory, each push waiting for its reply ({cfg['update_rule']})",
                      f"{results['loopback_shm_waiting_rt_per_s']:.0f}", "pipeline_pushes: false")
        table.add_row("shared memory: pipelined / waiting pushes", f"{results['loopback_shm_pipelined_over_waiting']:.2f}",
                      "")
    table.add_row("seed's server (reimplemented) get+push round trips/s", f"{results['seed_rt_per_s']:.0f}",
                  "lazy rule, no replies to pushes")
    table.add_row(f"loopback ({cfg['update_rule']}) / seed's server", f"{results['loopback_over_seed']:.2f}", ">= 4")
    for rule, ratio in results["loopback_over_seed_by_rule"].items():
        if rule != cfg["update_rule"]:
            table.add_row(f"loopback ({rule}) / seed's server", f"{ratio:.2f}", "the seed's own maths" if rule == "lazy" else "")
    table.add_row(f"shared memory ({cfg['update_rule']}) / seed's server", f"{results['loopback_shm_over_seed']:.2f}",
                  ">= 4")
    workers = cfg["workers"]
    table.add_row("sync step, 1 worker (ms)", f"{results['sync_1_worker_ms']:.2f}", "")
    table.add_row(f"sync step, {workers} workers (ms)", f"{results[f'sync_{workers}_workers_ms']:.2f}", "")
    table.add_row(f"{workers} workers / 1 worker", f"{results['sync_ratio']:.2f}", "<= 2")
    table.add_row(f"sync step, 1 worker pushing {workers} x {cfg['rows']} rows (ms)",
                  f"{results['sync_1_worker_all_rows_ms']:.2f}", "same server work")
    table.add_row(f"{workers} workers / 1 worker with the same rows", f"{results['sync_ratio_same_rows']:.2f}",
                  "cost of synchronising")
    table.add_row(f"RSS after creating {mem['rows']} x {mem['dim']} (GiB)", f"{mem['rss_gib']:.2f}",
                  f"weights {mem['weights_gib']:.2f}")
    table.add_row("peak RSS during creation (GiB)", f"{mem['peak_gib']:.2f}", "no 2nd copy")
    scale = 10_000_000 * 128 / (mem["rows"] * mem["dim"])
    table.add_row("10M x 128, weights + fully used momentum (GiB)", f"{mem['bound_gib'] * scale:.2f}", "fits 24 GB")
    console.print(table)
