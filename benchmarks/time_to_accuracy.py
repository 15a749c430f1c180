"""Time to accuracy: full softmax vs random negatives (Partial FC's rule) vs HF-softmax, against time.

    PYTHONPATH=. python benchmarks/time_to_accuracy.py --classes 20000 --steps 6000 \
        --cells full random:0.01 annoy:0.01 hnsw:0.01 exact:0.01 --seeds 0 1 2 \
        --out docs/results/time_to_accuracy_20k.json --resume

The embedding-level regime of issue 12 (`data.source: latent`, `model.arch: mlp`): synthetic
identities as vectors, where a step's cost is the classifier's as at millions of identities
and where runs converge on a CPU. Every cell trains with `hfs.train.Trainer` (the engine of
`hfs train`) on the same data, backbone, head and lr schedule, from the same seed, and is
evaluated every ``--eval-every`` steps (the clocks stop while it is evaluated):

- held-out top-1: unseen views of the training identities, scored against ALL classes;
- verification TAR at FAR = ``--far`` on identities never trained on: view 0 against view 1
  of ``--verify-identities`` identities, every cross-identity pair an impostor
  (``U^2 - U`` impostor pairs and ``U`` genuine ones);
- training time so far: wall seconds, and CPU seconds: this process's (all threads, so an
  hnsw/exact build thread too) plus its finished children's (annoy builds) (``--threads``
  torch threads; with 1 thread CPU time is the work done, far less affected by other load on
  the box than wall time).

``--regime images`` runs the same comparison on the CNN path instead: rendered synthetic faces
(``hfs.data.synthetic``, clusters of 8 look-alikes, pregenerated once into ``--cache``) through
the ``tiny`` CNN, with verification pairs of rendered identities never trained on. There the
backbone, not the classifier, is most of a step's cost.

``--budget-cpu-s`` gives every cell the same CPU budget instead of the same steps (the C = 1M
comparison of issue 12): each cell first trains for ``--calibrate-cpu-s`` to measure its CPU
cost per step, then runs the number of steps that fits the budget, its cosine schedule ending
there, with ``--evals`` evaluations. ``--val-samples`` scores a fixed random subset of the
held-out samples (against all classes) where scoring all of them would cost more than training.

A cell is ``full`` or ``SAMPLER:RATE`` (sample_num = RATE x C), optionally followed by overrides of its
own (``exact:0.01,sampler.ceiling=positive``). A run is *converged* when
held-out top-1 moved less than ``--flat`` over its last 20% of steps. ``--resume`` keeps
the (cell, seed) results already in ``--out``; the file is rewritten after every cell.
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import shutil
import sys
import time
from pathlib import Path
from typing import Any


def _one_blas_thread_unless_told(argv: list[str]) -> None:
    """With ``--threads 1`` (the default) numpy's BLAS gets one thread too, set before numpy loads it.

    CPU seconds measure the work done only when no pool spins for it: on a loaded 2-core box a
    64 x 64 x 1000 matmul took 0.1 ms with one OpenBLAS thread and 20-40 ms with two.
    """
    threads = argv[argv.index("--threads") + 1] if "--threads" in argv[:-1] else "1"
    if threads != "0":
        for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ.setdefault(var, threads)


if __name__ == "__main__":
    _one_blas_thread_unless_told(sys.argv)

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy_vs_cost import parse_cell, previous_run  # noqa: E402
from evidence_common import script_parser, start_run, write_results  # noqa: E402

log = logging.getLogger("time_to_accuracy")


def cpu_seconds() -> float:
    """CPU seconds of this process (all its threads: hnsw/exact builds run in one) plus its finished
    children (annoy builds run in a child process), each counted once."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def tar_at_far(emb_a: np.ndarray, emb_b: np.ndarray, far: float) -> float:
    """TAR at ``far``: row i of ``emb_a`` and ``emb_b`` are one identity, every other pair an impostor."""
    a = emb_a / np.linalg.norm(emb_a, axis=1, keepdims=True)
    b = emb_b / np.linalg.norm(emb_b, axis=1, keepdims=True)
    scores = a @ b.T
    genuine = np.diag(scores).copy()
    np.fill_diagonal(scores, -np.inf)
    impostor = scores[np.isfinite(scores)]
    k = max(1, int(np.floor(far * impostor.size)))  # at most this many impostors above the threshold
    threshold = np.partition(impostor, impostor.size - k)[impostor.size - k]
    return float((genuine > threshold).mean())


class Probe:
    """Trainer callback: the training clocks, and an evaluation every ``every`` steps (clocks paused)."""

    def __init__(self, args: argparse.Namespace, verify_a: Any, verify_b: Any) -> None:
        self.args, self.verify_a, self.verify_b = args, verify_a, verify_b
        self.wall = self.cpu = 0.0
        self.curve: list[dict[str, float]] = []
        self.rule_stats: dict[str, float] = {}
        self._mark()

    def _mark(self) -> None:
        self._t, self._c = time.perf_counter(), cpu_seconds()

    def __call__(self, trainer, step: int, record: dict) -> None:
        self.wall += time.perf_counter() - self._t
        self.cpu += cpu_seconds() - self._c
        self.rule_stats.update({k: v for k, v in record.items() if k.startswith("select_")})
        if step % self.args.eval_every == 0 or step == self.args.steps:
            self.curve.append({"step": step, "wall_s": self.wall, "cpu_s": self.cpu,
                               "active_classes": int(trainer.fc.active_classes),
                               **self.rule_stats, **self.evaluate(trainer)})
            log.info("step %d: %s", step, self.curve[-1])
        self._mark()

    def evaluate(self, trainer) -> dict[str, float]:
        import torch

        top1 = trainer.validate()
        trainer.backbone.eval()
        try:
            with torch.no_grad():
                emb_a = trainer.backbone(self.verify_a.to(trainer.device)).float().cpu().numpy()
                emb_b = trainer.backbone(self.verify_b.to(trainer.device)).float().cpu().numpy()
        finally:
            trainer.backbone.train()
        return {"val_top1": float(top1), "tar": tar_at_far(emb_a, emb_b, self.args.far)}


def split_cell(cell: str, classes: int) -> tuple[str, int, list[str]]:
    """``SAMPLER:RATE[,section.key=value...]`` -> (sampler, sample_num, that cell's own overrides)."""
    base, *sets = cell.split(",")
    name, sample_num = parse_cell(base, classes)
    return name, sample_num, sets


def cell_config(args: argparse.Namespace, name: str, sample_num: int, output_dir: Path, seed: int,
                cell_sets: list[str] | tuple[str, ...] = ()):
    from hfs.config import apply_overrides, config_from_dict

    fc = {"mode": "full"} if name == "full" else {"mode": "sampled", "sample_num": sample_num}
    images = args.regime == "images"
    data = {
        "data": {"source": "synthetic" if images else "latent", "num_workers": 0,
                 "image_size": args.image_size if images else args.input_dim},
        "model": {"arch": "tiny" if images else "mlp", "embedding_size": args.dim},
        "head": {"type": args.head, "scale": args.scale, "margin": args.margin},
        "fc": fc,
        "sampler": {"type": name if name != "full" else "random"},
        "optim": {"lr": args.lr, "schedule": "cosine", "warmup_steps": args.warmup},
        "train": {"output_dir": str(output_dir), "batch_size": args.batch, "max_steps": args.steps,
                  "checkpoint_every": 0, "log_every": 100, "seed": seed},
    }
    # the same --set section.key=value as the hfs commands, then the cell's own
    return config_from_dict(apply_overrides(data, [*(args.set or []), *cell_sets]))


def converged(curve: list[dict[str, float]], steps: int, flat: float) -> bool:
    """Held-out top-1 moved less than ``flat`` over the last 20% of the steps: from the last
    evaluation at or before 80% of ``steps`` (the start of that stretch must be measured: two
    evaluations a few steps apart at the end prove nothing) to the end."""
    start = [p["step"] for p in curve if p["step"] <= 0.8 * steps]
    if not start:
        return False
    top1 = [p["val_top1"] for p in curve if p["step"] >= max(start)]
    return len(top1) >= 2 and max(top1) - min(top1) < flat


def run_cell(args: argparse.Namespace, cell: str, seed: int, workdir: Path) -> dict[str, Any]:
    import torch

    from hfs.train.trainer import Trainer

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    name, sample_num, cell_sets = split_cell(cell, args.classes)
    out_dir = workdir / f"{cell.replace(':', '_').replace(',', '+').replace('=', '_')}_seed{seed}"
    train, val, verify_a, verify_b = regime_data(args, seed, args.verify_identities)
    val = held_out(val, args.val_samples, args.data_seed)
    per_step = None
    if args.budget_cpu_s > 0:
        per_step = calibrate(args, name, sample_num, out_dir, seed, (train, val, args.classes), cell_sets)
        args = budgeted(args, per_step)
    shutil.rmtree(out_dir, ignore_errors=True)
    cfg = cell_config(args, name, sample_num, out_dir, seed, cell_sets)
    probe = Probe(args, verify_a, verify_b)
    result = Trainer(cfg, datasets=(train, val, args.classes), callbacks=[probe]).run()
    shutil.rmtree(out_dir, ignore_errors=True)
    if result.interrupted:  # a cut-short cell is not a result: --resume runs it again
        raise CellInterrupted(f"{cell} seed {seed} was interrupted at step {result.steps}; not recorded")
    final = probe.curve[-1]
    row = {"cell": cell, "seed": seed, "sampler": name, "sample_num": sample_num, "rate": sample_num / args.classes,
           "val_top1": final["val_top1"], "tar": final["tar"], "train_wall_s": probe.wall, "train_cpu_s": final["cpu_s"],
           "final_loss": result.loss, "converged": converged(probe.curve, args.steps, args.flat),
           "steps": args.steps, "curve": probe.curve}
    if per_step is not None:
        row["calibrated_cpu_s_per_step"] = per_step
    log.info("%s seed %d: top1 %.4f TAR %.4f in %.0f s (cpu %.0f s), converged %s", cell, seed, row["val_top1"],
             row["tar"], probe.wall, probe.cpu, row["converged"])
    return row


def regime_data(args: argparse.Namespace, seed: int, verify_identities: int) -> tuple[Any, Any, Any, Any]:
    """``(train, held-out, verify_a, verify_b)`` of the regime: ``verify_a[i]`` and ``verify_b[i]`` are
    two views of the i-th of ``verify_identities`` identities never trained on (None when 0)."""
    import torch

    if args.regime == "images":
        return image_data(args, seed, verify_identities)
    from hfs.data.latent import LatentGenerator, LatentIdentities

    gen = LatentGenerator(args.data_seed, input_dim=args.input_dim)
    regime = label_plan(args).regime
    train = LatentIdentities(gen, args.classes, args.views, split="train", val_per_class=1, regime=regime)
    val = LatentIdentities(gen, args.classes, args.views, split="val", val_per_class=1, regime=regime)
    if not verify_identities:
        return train, val, None, None
    unseen = np.arange(args.classes, args.classes + verify_identities)
    verify_a = torch.from_numpy(gen.samples(unseen, np.zeros_like(unseen)))
    verify_b = torch.from_numpy(gen.samples(unseen, np.ones_like(unseen)))
    return train, val, verify_a, verify_b


def image_data(args: argparse.Namespace, seed: int, verify_identities: int) -> tuple[Any, Any, Any, Any]:
    """Rendered faces: identities ``[0, C)`` for training (``--views`` views, one held out, laid out
    by the regime's label plan) and ``[C, C + U)`` for verification, from one pregenerated cache
    (``accuracy_vs_cost.pregenerate``; twice the views when a share of the labels are duplicates)."""
    import torch

    from accuracy_vs_cost import ArrayIdentities, pregenerate
    from hfs.data.transforms import EvalTransform
    from PIL import Image

    plan = label_plan(args)
    identities = args.classes + verify_identities
    views = (args.views + 1) * (2 if plan.regime.duplicates else 1)
    path = pregenerate(Path(args.cache), identities, views, args.image_size, seed=args.data_seed,
                       jobs=args.render_jobs)
    images = np.load(path, mmap_mode="r")
    seen = images[: args.classes]
    train = ArrayIdentities(seen, args.views, "train", args.image_size, seed, plan=plan)
    val = ArrayIdentities(seen, args.views, "val", args.image_size, seed, plan=plan)
    if not verify_identities:
        return train, val, None, None
    to_tensor = EvalTransform(args.image_size)
    unseen = images[args.classes:identities]
    verify_a = torch.stack([to_tensor(Image.fromarray(np.asarray(view))) for view in unseen[:, 0]])
    verify_b = torch.stack([to_tensor(Image.fromarray(np.asarray(view))) for view in unseen[:, 1]])
    return train, val, verify_a, verify_b


def label_plan(args: argparse.Namespace):
    """The regime's labels over the generated identities (``--duplicates``, ``--label-noise``, ``--min-views``)."""
    from hfs.data.plan import LabelPlan, Regime

    regime = Regime(args.duplicates, args.label_noise, args.min_views)
    regime.check(args.views, lambda field: "--" + field.replace("_", "-"))
    return LabelPlan(args.classes, args.views, regime, val_views=1, seed=args.data_seed)


def held_out(val, samples: int, seed: int):
    """All held-out samples, or a fixed random subset of ``samples`` of them (same for every cell)."""
    if samples <= 0 or samples >= len(val):
        return val
    from torch.utils.data import Subset

    pick = np.sort(np.random.default_rng([seed, 11]).choice(len(val), samples, replace=False))
    return Subset(val, pick.tolist())


class StepClock:
    """Trainer callback: CPU seconds per step after the first, stopping the run once ``budget`` is spent."""

    def __init__(self, budget: float) -> None:
        self.budget = budget
        self.first: tuple[int, float] | None = None
        self.last: tuple[int, float] | None = None
        self.stopped = False

    def __call__(self, trainer, step: int, record: dict) -> None:
        now = (step, cpu_seconds())
        self.first = self.first or now
        self.last = now
        if not self.stopped and now[1] - self.first[1] >= self.budget and step > self.first[0]:
            self.stopped = True
            trainer.request_stop("calibrated")

    def per_step(self) -> float:
        if self.first is None or self.last is None or self.last[0] <= self.first[0]:
            raise SystemExit("the calibration ran fewer than 2 steps: raise --calibrate-cpu-s")
        return (self.last[1] - self.first[1]) / (self.last[0] - self.first[0])


def calibrate(args: argparse.Namespace, name: str, sample_num: int, out_dir: Path, seed: int,
              datasets: tuple, cell_sets: list[str] | tuple[str, ...] = ()) -> float:
    """CPU seconds per step of this cell, from ``--calibrate-cpu-s`` of training it (index builds
    that finished by then included: a slow index shows its cost only over a long enough run)."""
    from hfs.train.trainer import Trainer

    shutil.rmtree(out_dir, ignore_errors=True)
    long_schedule = argparse.Namespace(**{**vars(args), "steps": 10 ** 7})
    clock = StepClock(args.calibrate_cpu_s)
    result = Trainer(cell_config(long_schedule, name, sample_num, out_dir, seed, cell_sets), datasets=datasets,
                     callbacks=[clock]).run()
    shutil.rmtree(out_dir, ignore_errors=True)
    if result.interrupted and not clock.stopped:
        raise CellInterrupted(f"{name} calibration was interrupted; not recorded")
    per_step = clock.per_step()
    log.info("%s:%d calibrated at %.2f ms CPU per step", name, sample_num, 1e3 * per_step)
    return per_step


def budgeted(args: argparse.Namespace, per_step: float) -> argparse.Namespace:
    """``args`` with the steps that fit ``--budget-cpu-s`` at ``per_step`` and ``--evals`` evaluations."""
    every = max(1, int(args.budget_cpu_s / per_step) // args.evals)
    return argparse.Namespace(**{**vars(args), "steps": every * args.evals, "eval_every": every})


class CellInterrupted(RuntimeError):
    """The trainer stopped early (a signal): the cell's numbers are not a finished run's."""


def add_regime_args(p: argparse.ArgumentParser, *, batch: int) -> None:
    """The regime's data, backbone, head and schedule options (what :func:`cell_config` reads)."""
    p.add_argument("--regime", default="latent", choices=("latent", "images"),
                   help="latent: identity vectors through an MLP; images: rendered faces through the tiny CNN")
    p.add_argument("--image-size", type=int, default=32, help="--regime images: image side in pixels")
    p.add_argument("--cache", default="benchmarks/.cache/images", help="--regime images: folder of the rendered images")
    p.add_argument("--render-jobs", type=int, default=2, help="--regime images: processes rendering the cache")
    p.add_argument("--views", type=int, default=8, help="training samples per identity (the most, with --min-views)")
    p.add_argument("--duplicates", type=float, default=0.0,
                   help="share of the labels that are a second label of another label's identity")
    p.add_argument("--label-noise", type=float, default=0.0,
                   help="share of the training samples labelled with another label, drawn uniformly")
    p.add_argument("--min-views", type=int, default=0,
                   help="long tail: training views per label log-uniform in [min-views, --views] (0: all alike)")
    p.add_argument("--input-dim", type=int, default=64, help="length of the generated input vectors")
    p.add_argument("--dim", type=int, default=64, help="embedding size D")
    p.add_argument("--batch", type=int, default=batch, help="batch size")
    p.add_argument("--lr", type=float, default=0.1, help="base learning rate (cosine schedule)")
    p.add_argument("--warmup", type=int, default=200, help="warm-up steps")
    p.add_argument("--head", default="cosface", choices=("softmax", "cosface", "arcface"), help="margin head")
    p.add_argument("--scale", type=float, default=32.0, help="logit scale s")
    p.add_argument("--margin", type=float, default=0.2, help="margin m")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = script_parser(__doc__)
    p.add_argument("--classes", type=int, default=20_000, help="training identities C")
    p.add_argument("--cells", nargs="+", default=["full", "random:0.01", "annoy:0.01", "hnsw:0.01", "exact:0.01"],
                   help="full or SAMPLER:RATE, each optionally followed by its own overrides: "
                        "exact:0.01,sampler.ceiling=positive")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds; every cell runs once per seed")
    add_regime_args(p, batch=256)
    p.add_argument("--steps", type=int, default=6000, help="training steps of every cell")
    p.add_argument("--eval-every", type=int, default=500, help="steps between evaluations")
    p.add_argument("--verify-identities", type=int, default=5000, help="unseen identities of the verification pairs")
    p.add_argument("--far", type=float, default=1e-4, help="false accept rate of the reported TAR")
    p.add_argument("--flat", type=float, default=0.005, help="converged: top-1 range over the last 20%% of steps below this")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the generated identities")
    p.add_argument("--val-samples", type=int, default=0,
                   help="held-out samples scored (a fixed random subset; 0 = all, one per class)")
    p.add_argument("--budget-cpu-s", type=float, default=0.0,
                   help="equal CPU budget per cell instead of --steps (0 = off); see the module docstring")
    p.add_argument("--calibrate-cpu-s", type=float, default=120.0,
                   help="--budget-cpu-s: CPU seconds of each cell's calibration run")
    p.add_argument("--evals", type=int, default=5, help="--budget-cpu-s: evaluations per cell")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                   help="config override for every cell, as `hfs train --set` (repeatable)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads and numpy BLAS threads (0 = their defaults)")
    p.add_argument("--resume", action="store_true", help="keep the (cell, seed) results already in --out")
    p.add_argument("--workdir", default="benchmarks/.cache/time_to_accuracy", help="scratch folder of the runs")
    p.add_argument("--out", default="docs/results/time_to_accuracy.json", help="JSON results (rewritten after each cell)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    context = start_run(args)
    rows, earlier = previous_run(Path(args.out)) if args.resume else ([], [])
    if earlier:
        context["earlier_runs"] = earlier
    done = {(r["cell"], r["seed"]) for r in rows}
    order = {cell: i for i, cell in enumerate(args.cells)}
    for seed in args.seeds:
        for cell in args.cells:
            if (cell, seed) in done:
                log.info("%s seed %d: kept from %s", cell, seed, args.out)
                continue
            try:
                rows.append(run_cell(args, cell, seed, Path(args.workdir)))
            except CellInterrupted as exc:
                log.error("%s; finished cells are in %s", exc, args.out)
                raise SystemExit(130) from None
            rows.sort(key=lambda r: (order.get(r["cell"], len(order)), r["seed"]))
            write_results(args.out, context, rows)  # a cut-short run keeps every finished cell
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
