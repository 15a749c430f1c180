"""`hfs bench-sampler`: speed, recall and softmax-mass coverage of the class samplers, and upkeep.

Quality is measured against the exact answer over the same weights:

- recall@k: the share of each query's exact top-k classes that the sampler's k candidates
  contain (per query, then averaged);
- softmax-mass coverage: with the exact logits ``z_ij = scale * cos(f_i, w_j)`` (or
  ``f_i . w_j`` for the dot metric), query i's negative probability mass is
  ``N_i = sum_{j != y_i} exp(z_ij)``; the active set A captures
  ``C_i = sum_{j in A, j != y_i} exp(z_ij)``. Coverage is the mean over queries of
  ``C_i / N_i``: the share of the full softmax's negative mass (and so of its gradient on
  negatives) that sampled training sees. ``random`` captures about S / C.

Without ``--weights`` the classes are *structured*: clusters of similar identities, as in a
trained face classifier, with queries near their own class. Uniformly random vectors are
the worst case for any index and predict little.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from hfs.utils.errors import HfsError


CHUNK = 65536


@dataclass
class SamplerBenchSettings:
    """What `hfs bench-sampler` measures (the sampler knobs come from the config's `sampler` section)."""

    num_classes: int = 1_000_000
    dim: int = 256
    batch_size: int = 256
    sample_num: int = 1000
    samplers: list[str] = field(default_factory=lambda: ["annoy", "hnsw", "exact", "random"])
    weights: Path | None = None
    scale: float = 64.0
    batches: int = 5
    k: int = 0
    cluster_size: int = 32
    spread: float = 1.0
    noise: float = 0.7
    seed: int = 0
    upkeep_steps: int = 0
    upkeep_samplers: list[str] = field(default_factory=lambda: ["annoy", "hnsw"])
    upkeep_baseline: bool = True
    lr: float = 0.1
    #: query-time ``sampler`` keys -> values each built index is also measured with (no rebuild)
    query_sweep: dict[str, list[int]] = field(default_factory=dict)


# ----------------------------------------------------------------------------- data


def structured_weights(num_classes: int, dim: int, cluster_size: int = 32, spread: float = 1.0,
                       seed: int = 0, on_rows: Callable[[int], None] | None = None) -> np.ndarray:
    """Unit class vectors in clusters: ``normalise(centre + spread * g / sqrt(dim))``.

    Two classes of one cluster have cosine about ``1 / (1 + spread^2)``, classes of
    different clusters about 0 — the hard negatives an index should find.
    """
    from hfs.samplers.base import normalise_rows

    rng = np.random.default_rng(seed)
    clusters = max(1, math.ceil(num_classes / cluster_size))
    centres = normalise_rows(rng.standard_normal((clusters, dim), dtype=np.float32))
    assign = rng.permutation(num_classes) % clusters
    out = np.empty((num_classes, dim), dtype=np.float32)
    for start in range(0, num_classes, CHUNK):
        stop = min(start + CHUNK, num_classes)
        noise = rng.standard_normal((stop - start, dim), dtype=np.float32) * (spread / math.sqrt(dim))
        out[start:stop] = normalise_rows(centres[assign[start:stop]] + noise)
        if on_rows is not None:
            on_rows(stop - start)
    return out


def queries_near(class_rows: np.ndarray, noise: float, rng: np.random.Generator) -> np.ndarray:
    """Features near their classes: ``normalise(w_y / |w_y| + noise * g / sqrt(dim))``."""
    from hfs.samplers.base import normalise_rows

    dim = class_rows.shape[1]
    jitter = rng.standard_normal(class_rows.shape, dtype=np.float32) * (noise / math.sqrt(dim))
    return normalise_rows(normalise_rows(class_rows) + jitter)


def load_weights(path: Path) -> np.ndarray:
    """A (C, D) float matrix from a .npy file, memory-mapped; a clear error otherwise."""
    try:
        matrix = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise HfsError(f"--weights {path}: not a readable .npy file ({exc})") from None
    if matrix.ndim != 2 or matrix.dtype.kind != "f" or 0 in matrix.shape:
        raise HfsError(f"--weights {path}: expected a non-empty 2-D float matrix, got shape {matrix.shape} "
                       f"dtype {matrix.dtype}")
    return np.ascontiguousarray(matrix, dtype=np.float32)


# ----------------------------------------------------------------------------- metrics


class ExactReference:
    """Exact top-k and softmax normalisers for one batch of queries (chunked, in torch)."""

    def __init__(self, weights: np.ndarray, features: np.ndarray, labels: np.ndarray, k: int, scale: float,
                 metric: str) -> None:
        import torch

        from hfs.samplers.base import normalise_rows

        self.metric, self.scale, self.labels = metric, scale, labels
        self.features = normalise_rows(features) if metric == "cosine" else features.astype(np.float32)
        query = torch.from_numpy(self.features)
        positives = torch.from_numpy(labels)
        rows_of_batch = torch.arange(len(labels))
        log_negative = torch.full((len(labels),), float("-inf"), dtype=torch.float64)
        best_v = torch.empty((len(labels), 0))
        best_i = torch.empty((len(labels), 0), dtype=torch.int64)
        for start in range(0, weights.shape[0], CHUNK):
            logits = query @ torch.from_numpy(self._rows(weights[start:start + CHUNK])).T
            v, i = logits.topk(min(k, logits.shape[1]), dim=1)
            both_v, both_i = torch.cat([best_v, v], 1), torch.cat([best_i, i + start], 1)
            best_v, pick = both_v.topk(min(k, both_v.shape[1]), dim=1)
            best_i = both_i.gather(1, pick)
            inside = (positives >= start) & (positives < start + logits.shape[1])
            scaled = logits.double() * self._logit_scale
            scaled[rows_of_batch[inside], positives[inside] - start] = float("-inf")
            log_negative = torch.logaddexp(log_negative, torch.logsumexp(scaled, dim=1))
        self.log_negative_mass = log_negative.numpy()
        self.topk = best_i.numpy()

    @property
    def _logit_scale(self) -> float:
        return self.scale if self.metric == "cosine" else 1.0

    def _rows(self, rows: np.ndarray) -> np.ndarray:
        from hfs.samplers.base import normalise_rows

        rows = np.asarray(rows, dtype=np.float32)
        return normalise_rows(rows) if self.metric == "cosine" else rows

    def recall(self, candidates: np.ndarray) -> float:
        """Mean share of each query's exact top-k found among its candidates."""
        k = self.topk.shape[1]
        hits = [np.intersect1d(c[c >= 0], t).size for c, t in zip(candidates, self.topk)]
        return float(np.mean(hits) / k)

    def coverage(self, weights: np.ndarray, active: np.ndarray) -> float:
        """Mean share of each query's negative softmax mass captured by the active set."""
        logits = self._logit_scale * (self.features.astype(np.float64) @ self._rows(weights[active]).astype(np.float64).T)
        is_positive = active[None, :] == self.labels[:, None]
        logits = np.where(is_positive, -np.inf, logits)
        top = logits.max(axis=1, keepdims=True)
        log_captured = np.log(np.exp(logits - top).sum(axis=1)) + top[:, 0]
        return float(np.mean(np.exp(log_captured - self.log_negative_mass)))


class PeakRss:
    """Peak anonymous resident memory above the starting level while the block runs (Linux /proc).

    Anonymous memory (``RssAnon``) leaves out the memory-mapped weights file, so the number
    is what the index and its queries allocate. Each sampler is measured in a fresh child
    process: freed heap is not returned to the OS, and would hide the next one's memory.
    """

    def __init__(self, interval: float = 0.02) -> None:
        self.interval, self.peak_mb = interval, float("nan")
        self._stop = threading.Event()

    @staticmethod
    def _rss_mb() -> float:
        from hfs.utils.process import rss_mb

        return rss_mb("RssAnon")

    def _poll(self) -> None:
        while not self._stop.wait(self.interval):
            self._peak = max(self._peak, self._rss_mb())

    def __enter__(self) -> "PeakRss":
        self._base = self._peak = self._rss_mb()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, self._rss_mb())
        self.peak_mb = self._peak - self._base


# ----------------------------------------------------------------------------- query bench


@dataclass
class Batch:
    features: np.ndarray
    labels: np.ndarray
    reference: ExactReference


def make_batches(weights: np.ndarray, settings: SamplerBenchSettings, k: int, metric: str,
                 on_batch: Callable[[], None] = lambda: None) -> list[Batch]:
    """Query batches near random classes, each with its exact reference."""
    rng = np.random.default_rng(settings.seed + 1)
    batches = []
    for _ in range(settings.batches):
        labels = rng.integers(0, weights.shape[0], settings.batch_size).astype(np.int64)
        features = queries_near(weights[labels], settings.noise, rng)
        batches.append(Batch(features, labels, ExactReference(weights, features, labels, k, settings.scale, metric)))
        on_batch()
    return batches


def parse_query_sweep(texts: Iterable[str]) -> dict[str, list[int]]:
    """``["sampler.hnsw_ef=16,32", ...]`` -> ``{"hnsw_ef": [16, 32]}``, checked against the samplers' query knobs."""
    from hfs.samplers import SAMPLERS

    knobs = {key for name in SAMPLERS.names() for key in SAMPLERS.get(name).query_knobs}
    sweep: dict[str, list[int]] = {}
    for text in texts:
        key, sep, values = text.partition("=")
        key = key.strip().removeprefix("sampler.")
        if not sep or key not in knobs:
            raise HfsError(f"--query-sweep '{text}': expected KEY=V1,V2,... with KEY one of "
                           f"{', '.join(sorted(knobs))} (settings a built index can change without a rebuild)")
        try:
            sweep[key] = [int(v) for v in values.split(",") if v.strip()]
        except ValueError:
            raise HfsError(f"--query-sweep '{text}': values must be integers") from None
        if not sweep[key]:
            raise HfsError(f"--query-sweep '{text}': no values given")
    return sweep


def query_variants(sampler, sweep: dict[str, list[int]]) -> list[tuple[str, dict[str, int]]]:
    """(label, {attribute: value}) for each setting to measure: as configured, then each swept value."""
    variants: list[tuple[str, dict[str, int]]] = [("", {})]
    for key, values in sweep.items():
        attr = sampler.query_knobs.get(key)
        if attr is not None:
            variants += [(f"{key}={value}", {attr: value}) for value in values]
    return variants


def bench_one_sampler(name: str, cfg, weights_path: str, batches: list[Batch], settings: SamplerBenchSettings,
                      k: int) -> list[dict[str, Any]]:
    """Build time, then per query setting: selection time per batch, recall@k, coverage; and peak memory.

    One row for the configured query settings and one per ``settings.query_sweep`` value
    this sampler understands, all from the same built index. Runs in a child process of
    its own (see :class:`PeakRss`); the weights come memory-mapped.
    """
    from hfs.samplers import build_sampler, select_active_classes
    from hfs.samplers.base import array_chunks

    import torch  # noqa: F401  (its import-time allocations are not the index's memory)

    weights = np.load(weights_path, mmap_mode="r")
    num_classes, dim = weights.shape
    uses_index = settings.sample_num < num_classes
    sampler = build_sampler(name, cfg.sampler, cfg.sampler_metric)
    configured = {attr: getattr(sampler, attr) for attr in sampler.query_knobs.values()}
    rows = []
    with PeakRss() as memory:
        t0 = time.perf_counter()
        if uses_index and sampler.needs_index:
            sampler.rebuild(array_chunks(weights), num_classes, dim)
        build_s = time.perf_counter() - t0
        for label, change in query_variants(sampler, settings.query_sweep):
            for attr, value in {**configured, **change}.items():
                setattr(sampler, attr, value)
            rng = np.random.default_rng(cfg.sampler.seed)
            times, recalls, coverages = [], [], []
            for batch in [batches[0]] + batches:  # the first batch once more, untimed: warm-up
                t0 = time.perf_counter()
                cands = sampler.candidates(batch.features, k) if uses_index else None
                active, _ = select_active_classes(batch.labels, cands, settings.sample_num, num_classes, rng)
                times.append(time.perf_counter() - t0)
                if sampler.needs_index and cands is not None:
                    recalls.append(batch.reference.recall(cands))
                coverages.append(batch.reference.coverage(weights, active))
            rows.append({"sampler": name, "setting": label or "as configured", "build_s": build_s,
                         "query_ms": 1000 * float(np.mean(times[1:])),
                         f"recall_at_{k}": float(np.mean(recalls[1:])) if recalls else None,
                         "coverage": float(np.mean(coverages[1:]))})
    sampler.close()
    for row in rows:
        row["peak_mem_mb"] = memory.peak_mb
    return rows


# ----------------------------------------------------------------------------- upkeep bench


def head_margin(head_cfg) -> Callable[[np.ndarray], np.ndarray]:
    """The positive-logit margin of the configured head (``HEADS``) on cosines: the trainer's own
    ``positive_margin``, ArcFace's fallback past pi - m included."""
    import torch

    from hfs.models import build_head

    head = build_head(head_cfg)
    return lambda cos: head.positive_margin(torch.from_numpy(np.asarray(cos))).numpy()


def simulate_training(weights: np.ndarray, selector, steps: int, settings: SamplerBenchSettings, *,
                      with_upkeep: bool, rng: np.random.Generator, on_step: Callable[[], None],
                      margin: Callable[[np.ndarray], np.ndarray] = lambda c: c) -> dict[str, float]:
    """A sampled training loop without a backbone: select, fetch rows, softmax step, write back.

    The per-step work is what a sampled FC does (B x S logits with the margin head's margin
    on the positive, the softmax gradient, a sparse SGD write of the active rows) — a
    perturbation shaped like SGD's (the normalisation's Jacobian is left out), not a model
    being trained. ``with_upkeep`` adds ``observe`` + ``maybe_refresh``.
    """
    from hfs.samplers.base import normalise_rows

    step_seconds = 0.0
    t_start = time.perf_counter()
    for step in range(1, steps + 1):
        t0 = time.perf_counter()
        labels = rng.integers(0, weights.shape[0], settings.batch_size).astype(np.int64)
        features = queries_near(weights[labels], settings.noise, rng)
        active, local = selector.select(features, labels, step)
        rows = weights[active]
        cosine = features @ normalise_rows(rows).T
        picked = (np.arange(len(labels)), local)
        cosine[picked] = margin(cosine[picked])
        logits = settings.scale * cosine
        logits -= logits.max(axis=1, keepdims=True)
        prob = np.exp(logits)
        prob /= prob.sum(axis=1, keepdims=True)
        prob[picked] -= 1.0
        grad = (settings.scale / len(labels)) * (prob.T @ features)
        rows -= settings.lr * grad.astype(np.float32)
        weights[active] = rows
        step_seconds += time.perf_counter() - t0
        if with_upkeep:
            selector.observe(active, rows)
            selector.maybe_refresh(step)
        on_step()
    wall = time.perf_counter() - t_start
    return {"wall_s": wall, "step_ms": 1000 * step_seconds / steps}


class ArrayRows:
    """A numpy matrix as the read-only store ``build_selector`` reads (the simulation writes it in place)."""

    MATRIX = "fc"

    def __init__(self, weights: np.ndarray) -> None:
        self.weights = weights

    def shape(self, name: str) -> tuple[int, int]:
        rows, dim = self.weights.shape
        return int(rows), int(dim)

    def iter_chunks(self, name: str, chunk_rows: int = CHUNK) -> Iterator[tuple[int, np.ndarray]]:
        from hfs.samplers.base import array_chunks

        return array_chunks(self.weights, chunk_rows)

    def get_rows(self, name: str, rows: np.ndarray) -> np.ndarray:
        return self.weights[np.asarray(rows, dtype=np.int64)]


def bench_upkeep(name: str, cfg, weights: np.ndarray, settings: SamplerBenchSettings, k: int,
                 on_step: Callable[[], None]) -> dict[str, Any]:
    """Upkeep of one sampler under the configured refresh policy, against the same loop with a frozen index.

    ``upkeep_share`` = (training-thread upkeep s + background CPU s) / (wall s of the steps
    themselves): what upkeep would add to a sampled step if the background work had no core
    of its own. ``added_share`` = (wall with upkeep - wall with a never-refreshed index) / the
    latter, measured directly; on a shared machine it is noisy, so both are reported.
    """
    from hfs.samplers import ActiveClassSelector, RefreshPolicy, build_selector, refresh_policy

    scfg = dataclasses.replace(cfg.sampler, type=name)  # the section of the sampler being compared

    def selector_over(matrix: np.ndarray, policy: RefreshPolicy) -> ActiveClassSelector:
        return build_selector(scfg, store=ArrayRows(matrix), num_classes=matrix.shape[0],
                              sample_num=settings.sample_num, queries_per_step=settings.batch_size,
                              seed=scfg.seed, metric=cfg.sampler_metric, matrix=ArrayRows.MATRIX, policy=policy)

    results: dict[str, Any] = {"sampler": name, "policy": scfg.refresh, "steps": settings.upkeep_steps}
    frozen_policy = RefreshPolicy("interval", interval=settings.upkeep_steps + 1, max_interval=0)
    live_policy = refresh_policy(scfg)
    runs = [("frozen", frozen_policy, False)] if settings.upkeep_baseline else []
    for label, policy, with_upkeep in runs + [("live", live_policy, True)]:
        matrix = weights.copy()
        selector = selector_over(matrix, policy)
        selector.wait_ready()
        base = selector.upkeep()
        run = simulate_training(matrix, selector, settings.upkeep_steps, settings, with_upkeep=with_upkeep,
                                rng=np.random.default_rng(settings.seed + 7), on_step=on_step,
                                margin=head_margin(cfg.head))
        if with_upkeep:
            up = selector.upkeep()
            results.update(live_wall_s=run["wall_s"], live_step_ms=run["step_ms"],
                           fg_s=up["fg_seconds"] - base["fg_seconds"],
                           bg_cpu_s=up["bg_cpu_seconds"] - base["bg_cpu_seconds"],
                           rebuilds=up["rebuilds"] - base["rebuilds"], rows_updated=up["rows_updated"],
                           final_drift=up["drift"])
            results["fg_share"] = results["fg_s"] / run["wall_s"]
            # Pessimistic: as if the background work had no free core and serialised with training.
            results["upkeep_share"] = (results["fg_s"] + results["bg_cpu_s"]) / (run["wall_s"] - results["fg_s"])
            results.update(_final_quality(matrix, selector, settings, k, cfg.sampler_metric))
        else:
            results.update(frozen_wall_s=run["wall_s"], frozen_step_ms=run["step_ms"])
        selector.close()
        del matrix
    if settings.upkeep_baseline:
        results["added_share"] = results["live_wall_s"] / results["frozen_wall_s"] - 1.0
    return results


def _final_quality(matrix: np.ndarray, selector, settings: SamplerBenchSettings, k: int, metric: str) -> dict:
    """Recall@k of the live (possibly stale) index against exact search on the trained weights."""
    rng = np.random.default_rng(settings.seed + 11)
    labels = rng.integers(0, matrix.shape[0], settings.batch_size).astype(np.int64)
    features = queries_near(matrix[labels], settings.noise, rng)
    reference = ExactReference(matrix, features, labels, k, settings.scale, metric)
    sampler = selector.sampler
    cands = sampler.candidates(features, k) if sampler is not None else np.full((len(labels), k), -1)
    return {"final_recall": reference.recall(cands)}


# ----------------------------------------------------------------------------- driver


@contextlib.contextmanager
def _weights_file(weights: np.ndarray, given: Path | None) -> Iterator[str]:
    """A .npy path holding ``weights`` for child processes: the user's file, or a temporary one."""
    if given is not None and np.load(given, mmap_mode="r").dtype == np.float32:
        yield str(given)
        return
    with tempfile.TemporaryDirectory(prefix="hfs-bench-") as tmp:
        path = Path(tmp) / "weights.npy"
        np.save(path, weights)
        yield str(path)


def _in_child(fn: Callable[..., Any], *args) -> Any:
    """Run ``fn(*args)`` in a fresh spawned process and return its result."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()



def run_sampler_bench(cfg, settings: SamplerBenchSettings, console=None) -> dict[str, Any]:
    """Everything `hfs bench-sampler` reports, as a JSON-able dict (the CLI renders and writes it)."""
    from hfs.samplers import SAMPLERS, neighbours_for
    from hfs.utils.log import progress

    for name in settings.samplers + (settings.upkeep_samplers if settings.upkeep_steps else []):
        try:
            SAMPLERS.get(name)
        except KeyError as exc:
            raise HfsError(f"--samplers: {exc.args[0]}") from None
    if settings.weights is not None:
        weights = load_weights(settings.weights)
        source = str(settings.weights)
    else:
        with progress(console) as bar:  # 1M x 256 takes a while: not a silent start
            task = bar.add_task("generating weights", total=settings.num_classes, info="")
            weights = structured_weights(settings.num_classes, settings.dim, settings.cluster_size, settings.spread,
                                         settings.seed, on_rows=lambda n: bar.advance(task, n))
        source = (f"structured: clusters of {settings.cluster_size}, spread {settings.spread}, "
                  f"query noise {settings.noise}")
    num_classes, dim = weights.shape
    k = neighbours_for(cfg.sampler, settings.sample_num, settings.batch_size, num_classes)
    metric = cfg.sampler_metric
    report: dict[str, Any] = {"settings": {**dataclasses.asdict(settings), "weights": source,
                                           "num_classes": num_classes, "dim": dim, "k": k, "metric": metric,
                                           "sampler_config": dataclasses.asdict(cfg.sampler)}}
    with progress(console) as bar:
        task = bar.add_task("exact reference", total=settings.batches, info="")
        batches = make_batches(weights, settings, k, metric, lambda: bar.advance(task))
        rows = []
        task = bar.add_task("samplers", total=len(settings.samplers), info="")
        writing = bar.add_task("writing weights for the sampler processes", total=1, info="")
        with _weights_file(weights, settings.weights) as weights_path:
            bar.advance(writing)
            for name in settings.samplers:
                bar.update(task, info=name)
                rows.extend(_in_child(bench_one_sampler, name, cfg, weights_path, batches, settings, k))
                bar.advance(task)
        random_cov = next((r["coverage"] for r in rows if r["sampler"] == "random"), None)  # as configured: first
        for row in rows:
            row["coverage_vs_random"] = row["coverage"] / random_cov if random_cov else None
        report["query"] = rows
        if settings.upkeep_steps:
            upkeep = []
            for name in settings.upkeep_samplers:
                runs = 2 if settings.upkeep_baseline else 1
                task = bar.add_task(f"upkeep {name}", total=runs * settings.upkeep_steps,
                                    info="frozen, then live" if runs == 2 else "live")
                upkeep.append(bench_upkeep(name, cfg, weights, settings, k, lambda t=task: bar.advance(t)))
            report["upkeep"] = upkeep
    return report


def _fmt(value: float | None, pattern: str) -> str:
    return "-" if value is None else pattern.format(value)


def render_report(report: dict[str, Any], console) -> None:
    """The rich tables `hfs bench-sampler` prints."""
    from rich.table import Table

    s = report["settings"]
    k = s["k"]
    table = Table(title=f"samplers: C={s['num_classes']:,} D={s['dim']} B={s['batch_size']} S={s['sample_num']} "
                        f"k={k} {s['metric']} scale={s['scale']:g} ({s['weights']})")
    swept = any(r.get("setting", "as configured") != "as configured" for r in report["query"])
    columns = ("sampler", "query setting") if swept else ("sampler",)
    for col in columns + ("build s", "query ms/batch", f"recall@{k}", "coverage", "x random", "peak mem MB"):
        table.add_column(col, justify="left" if col in columns else "right", no_wrap=col in columns)
    for r in report["query"]:
        recall = r[f"recall_at_{k}"]
        names = (r["sampler"], r.get("setting", "")) if swept else (r["sampler"],)
        table.add_row(*names, f"{r['build_s']:.2f}", f"{r['query_ms']:.1f}",
                      "-" if recall is None else f"{recall:.3f}", f"{r['coverage']:.4f}",
                      "-" if r["coverage_vs_random"] is None else f"{r['coverage_vs_random']:.1f}",
                      f"{r['peak_mem_mb']:.0f}")
    console.print(table)
    if "upkeep" in report:
        table = Table(title=f"upkeep over {s['upkeep_steps']} simulated sampled steps (policy "
                            f"{s['sampler_config']['refresh']}, lr {s['lr']:g})")
        for col in ("sampler", "step ms", "upkeep fg s", "bg cpu s", "upkeep share", "rebuilds", "rows upd.",
                    "wall frozen s", "wall live s", "added", "final recall"):
            table.add_column(col, justify="left" if col == "sampler" else "right")
        for r in report["upkeep"]:
            table.add_row(r["sampler"], f"{r['live_step_ms']:.1f}", f"{r['fg_s']:.2f}", f"{r['bg_cpu_s']:.1f}",
                          f"{100 * r['upkeep_share']:.1f}%", str(r["rebuilds"]), str(r["rows_updated"]),
                          _fmt(r.get("frozen_wall_s"), "{:.1f}"), f"{r['live_wall_s']:.1f}",
                          _fmt(r.get("added_share"), "{:+.1%}"),
                          f"{r['final_recall']:.3f}")
        console.print(table)
