"""`hfs bench-fc`: the classifier-layer step, HF-softmax vs full softmax, in one run.

The sampled step is what `SampledFC` does per optimizer step: the store's select (its own
index's query and the active rows, one round trip), the head's forward and backward, the
gradient push (and its wait, which includes the store's index upkeep where it applies the
step); the initial index build (in the store) is timed separately and amortised
over the refresh interval. The full step is the head over the whole C x D matrix plus the
dense SGD update of the matrix and its momentum. Features stand in for a backbone's output
(random, fixed seed), so only the classifier layer is measured.
"""

from __future__ import annotations

import dataclasses
import logging
import statistics
import tempfile
import time
from typing import Any, Callable

import numpy as np
import torch

from hfs.config import HfsConfig
from hfs.utils.process import free_port, memory_status_mb, peak_rss_mb

log = logging.getLogger(__name__)


def _labels(rng: np.random.Generator, num_classes: int, batch: int) -> torch.Tensor:
    return torch.from_numpy(rng.integers(0, num_classes, size=batch).astype(np.int64))


def time_full_steps(cfg: HfsConfig, num_classes: int, batch: int, steps: int, warmup: int = 1,
                    on_step: Callable[[], None] | None = None) -> list[float]:
    """Seconds per full-softmax step (head fwd/bwd over all C rows + SGD on the matrix)."""
    from hfs.fc import FullFC
    from hfs.models import build_head

    dim = cfg.model.embedding_size
    fc = FullFC(num_classes, dim, build_head(cfg.head), init_std=cfg.fc.init_std, seed=0)
    opt = torch.optim.SGD(fc.parameters(), lr=0.1, momentum=cfg.optim.momentum,
                          weight_decay=cfg.optim.weight_decay)
    rng = np.random.default_rng(0)
    times = []
    for i in range(warmup + steps):
        feats = torch.randn(batch, dim, requires_grad=True)
        labels = _labels(rng, num_classes, batch)
        t0 = time.perf_counter()
        fc(feats, labels).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
        if on_step is not None:
            on_step()
    return times


def time_sampled_steps(cfg: HfsConfig, num_classes: int, batch: int, sample_num: int, steps: int, warmup: int = 2,
                       wait_index: bool = False, on_built: Callable[[], None] | None = None,
                       on_step: Callable[[], None] | None = None) -> dict[str, Any]:
    """Seconds per SampledFC step with the configured store and sampler, plus the index build.

    The store's matrix, the selector and the layer come from the trainer's own factories
    (``hfs.fc.factories``) with this benchmark's ``batch`` and ``sample_num``.
    ``wait_index`` waits for a background first index before stepping, so that the steps
    run with it (and its drift tracking) — what the memory check needs to see.
    """
    from hfs.fc.factories import attach_sampled_index, create_matrix, plan_classifier, sampled_layer
    from hfs.models import build_head
    from hfs.paramserver import open_store

    dim = cfg.model.embedding_size
    with tempfile.TemporaryDirectory(prefix="hfs-bench-fc-") as tmp:
        plan = plan_classifier(cfg, num_classes, 0, sample_num=sample_num, batch_size=batch, output_dir=tmp)
        store = open_store(cfg.paramserver, plan.snapshot_dir)
        try:
            create_matrix(store, cfg, num_classes, seed=0)
            t0 = time.perf_counter()
            attach_sampled_index(cfg, store, num_classes, plan)  # the store builds it from its own rows
            if wait_index:
                wait_index_ready(store, "fc")
            build_s = time.perf_counter() - t0
            if on_built is not None:
                on_built()
            fc = sampled_layer(cfg, store, build_head(cfg.head), num_classes, plan)
            fc.set_hparams(0.1, cfg.optim.momentum, cfg.optim.weight_decay)
            rng = np.random.default_rng(0)
            times = []
            try:
                for step in range(warmup + steps):
                    if step == warmup:  # part timers cover the measured steps only
                        fc.timers = dict.fromkeys(fc.timers, 0.0)
                    feats = torch.randn(batch, dim, requires_grad=True)
                    labels = _labels(rng, num_classes, batch)
                    t0 = time.perf_counter()
                    fc(feats, labels, step).loss.backward()
                    fc.end_step(step)
                    if step >= warmup:
                        times.append(time.perf_counter() - t0)
                    if on_step is not None:
                        on_step()
                upkeep = dict(fc.index_stats())
                resident = resident_split_mb()  # while the index is still mapped
            finally:
                fc.close()
        finally:
            store.close()
    return {"times": times, "build_s": build_s, "timers": dict(fc.timers), "upkeep": upkeep, "resident_mb": resident}


def wait_index_ready(store: Any, matrix: str, timeout_s: float = 3600.0) -> bool:
    """Poll the store until its index over ``matrix`` is ready (False: none attached, or timed out).

    An idle in-process store advances a background build only when ticked; a server ticks itself.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        stats = store.index_stats(matrix)
        if not stats or stats.get("index_ready"):
            return bool(stats)
        tick = getattr(store, "tick", None)
        if tick is not None:
            tick()
        time.sleep(0.05)
    return False


def resident_split_mb() -> dict[str, float]:
    """This process's resident memory now, anonymous vs file-backed (Linux; empty elsewhere).

    File-backed pages (a memory-mapped annoy index, shared with the page cache) count in
    the peak RSS but the kernel can drop them; anonymous pages are the process's own.
    """
    status = memory_status_mb()
    return {key.lower() + "_mb": status[key] for key in ("RssAnon", "RssFile", "RssShmem") if key in status}


def _phase(bar: Any, name: str, total: int) -> Callable[[], None] | None:
    """A task on ``bar`` (a rich Progress, or None) and the function that advances it."""
    if bar is None:
        return None
    task = bar.add_task(name, total=total, info="")
    return lambda: bar.advance(task)


def bench_fc(cfg: HfsConfig, num_classes: int, batch: int, sample_num: int, steps: int = 20,
             full_steps: int = 3, skip_full: bool = False, amortise_steps: int = 0, bar: Any = None) -> dict[str, Any]:
    """Both steps at the same (C, D, B); the sampled one with ``sample_num`` active classes.

    The index build is charged to the sampled step as build_seconds / amortise_steps
    (default ``sampler.interval``: the most often the refresh policy may rebuild).
    """
    sampled = time_sampled_steps(cfg, num_classes, batch, sample_num, steps, on_built=_phase(bar, "index build", 1),
                                 on_step=_phase(bar, "sampled steps", steps + 2))
    step_s = statistics.median(sampled["times"])
    interval = amortise_steps or max(cfg.sampler.interval, 1)
    amortised = step_s + sampled["build_s"] / interval
    result: dict[str, Any] = {
        "num_classes": num_classes, "dim": cfg.model.embedding_size, "batch": batch, "sample_num": sample_num,
        "sampler": cfg.sampler.type, "head": cfg.head.type, "threads": torch.get_num_threads(),
        "sampled_step_ms": 1000 * step_s, "index_build_s": sampled["build_s"], "refresh_interval": interval,
        "sampled_amortised_ms": 1000 * amortised,
        "sampled_parts_ms": {k: 1000 * v / len(sampled["times"]) for k, v in sampled["timers"].items()},
        "sampler_upkeep": sampled["upkeep"],
    }
    # Under refresh=adaptive the next rebuild comes when the mean row drift reaches
    # drift_threshold (at most every max_interval steps): project that from the drift the
    # measured steps produced, and amortise the build over it too.
    drift = float(sampled["upkeep"].get("drift", 0.0))
    drift_per_step = drift / (len(sampled["times"]) + 2)
    s_cfg = cfg.sampler
    adaptive = s_cfg.max_interval or 10**9
    if drift_per_step > 0:
        adaptive = min(adaptive, max(int(s_cfg.drift_threshold / drift_per_step), s_cfg.interval))
    result.update({"drift_per_step": drift_per_step, "adaptive_interval_estimate": adaptive,
                   "sampled_adaptive_ms": 1000 * (step_s + sampled["build_s"] / adaptive)})
    if not skip_full:
        full = time_full_steps(cfg, num_classes, batch, full_steps, on_step=_phase(bar, "full steps", full_steps + 1))
        full_s = statistics.median(full)
        result.update({"full_step_ms": 1000 * full_s, "speedup": full_s / amortised,
                       "speedup_without_index_build": full_s / step_s,
                       "speedup_adaptive": full_s / (result["sampled_adaptive_ms"] / 1000)})
    result["peak_rss_mb"] = peak_rss_mb()
    return result


def render(result: dict[str, Any], console=None) -> None:
    from rich.table import Table

    from hfs.utils.log import make_console

    table = Table(title=f"classifier step: C={result['num_classes']:,} D={result['dim']} B={result['batch']} "
                        f"S={result['sample_num']} ({result['sampler']}, {result['head']})", show_header=False)
    table.add_row("sampled step (median)", f"{result['sampled_step_ms']:.1f} ms")
    table.add_row("index build", f"{result['index_build_s']:.1f} s, amortised over {result['refresh_interval']} steps")
    table.add_row("sampled step incl. upkeep", f"{result['sampled_amortised_ms']:.1f} ms")
    table.add_row("sampled step, build over the adaptive interval",
                  f"{result['sampled_adaptive_ms']:.1f} ms (drift {result['drift_per_step']:.2e}/step -> "
                  f"rebuild every ~{result['adaptive_interval_estimate']:,} steps)")
    table.add_row("  of which (mean)", ", ".join(f"{k} {v:.1f} ms" for k, v in result["sampled_parts_ms"].items()))
    if "full_step_ms" in result:
        table.add_row("full-softmax step (median)", f"{result['full_step_ms']:.0f} ms")
        table.add_row("speed-up (index build amortised)", f"{result['speedup']:.0f}x")
        table.add_row("speed-up (build over the adaptive interval)", f"{result['speedup_adaptive']:.0f}x")
        table.add_row("speed-up (steps only)", f"{result['speedup_without_index_build']:.0f}x")
    table.add_row("peak RSS", f"{result['peak_rss_mb']:.0f} MB")
    (console or make_console()).print(table)


# --------------------------------------------------------------------------- trainer memory


def _serve(port: int) -> None:
    """A throwaway `hfs serve-params` shard without snapshots (nothing to write at exit)."""
    from hfs.paramserver.launch import ServeOptions, serve

    serve(ServeOptions(port=port, snapshot_dir=None))


def _trainer_process(cfg: HfsConfig, num_classes: int, batch: int, sample_num: int, steps: int, out) -> None:
    """Run SampledFC steps against the server and report this process's peak RSS."""
    try:
        base_mb = peak_rss_mb()
        result = time_sampled_steps(cfg, num_classes, batch, sample_num, steps, warmup=1, wait_index=True)
        out.put({"num_classes": num_classes, "peak_rss_mb": peak_rss_mb(), "after_imports_mb": base_mb,
                 "step_ms": 1000 * statistics.median(result["times"]), **result["resident_mb"]})
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which raises it
        out.put({"error": f"{exc.__class__.__name__}: {exc}"})


def trainer_memory(cfg: HfsConfig, classes: list[int], batch: int, sample_num: int, steps: int = 5
                   ) -> list[dict[str, Any]]:
    """Peak RSS of a sampled-mode trainer process at each C, the matrix living in `hfs serve-params`.

    The server builds the configured sampler's first index (``sampler.type``) over its own rows
    and the trainer waits for it before stepping, so its steps select from it; the index is
    the server's memory, not the trainer's.
    Each C gets a fresh server process and a fresh trainer process (spawned, so nothing is
    inherited); only the trainer's memory is reported.
    """
    import multiprocessing as mp

    from hfs.utils.errors import HfsError

    ctx = mp.get_context("spawn")
    rows = []
    for num_classes in classes:
        port = free_port()
        server = ctx.Process(target=_serve, args=(port,), daemon=True)
        server.start()
        trainer = None
        try:
            # the trainer's store is this server: paramserver.address is that config key's own use
            run_cfg = dataclasses.replace(
                cfg, paramserver=dataclasses.replace(cfg.paramserver, address=f"tcp://127.0.0.1:{port}"))
            queue = ctx.Queue()
            trainer = ctx.Process(target=_trainer_process,
                                  args=(run_cfg, num_classes, batch, sample_num, steps, queue))
            trainer.start()
            row = _result_or_death(queue, trainer)
            trainer.join()
        finally:
            for proc in (trainer, server):
                if proc is not None and proc.is_alive():
                    proc.terminate()
                    proc.join(30)
        if "error" in row:
            raise HfsError(f"memory run at C={num_classes} failed: {row['error']}")
        rows.append(row)
    return rows


def _result_or_death(queue, proc) -> dict[str, Any]:
    """The child's result, or an error row once it has died without one (OOM-kill, segfault)."""
    import queue as queue_mod

    while True:
        try:
            return queue.get(timeout=1.0)
        except queue_mod.Empty:
            if not proc.is_alive():
                return {"error": f"the trainer process died (exit code {proc.exitcode}) without a result"}


def render_memory(rows: list[dict[str, Any]], sampler: str, console=None) -> None:
    from rich.table import Table

    from hfs.utils.log import make_console

    table = Table(title=f"sampled-mode trainer process, matrix in hfs serve-params ({sampler} sampler)")
    for col in ("C", "peak RSS", "after imports", "anon RSS at end", "file RSS at end", "step"):
        table.add_column(col, justify="right")
    for r in rows:
        anon, file = r.get("rssanon_mb"), r.get("rssfile_mb")
        table.add_row(f"{r['num_classes']:,}", f"{r['peak_rss_mb']:.0f} MB", f"{r['after_imports_mb']:.0f} MB",
                      "-" if anon is None else f"{anon:.0f} MB", "-" if file is None else f"{file:.0f} MB",
                      f"{r['step_ms']:.1f} ms")
    (console or make_console()).print(table)
