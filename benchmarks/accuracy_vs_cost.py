"""Accuracy against cost: full softmax vs HF-softmax (annoy, hnsw), exact top-k and random negatives.

    PYTHONPATH=. python benchmarks/accuracy_vs_cost.py --classes 10000 --steps 1500 \
        --cells full annoy:0.01 annoy:0.1 hnsw:0.01 exact:0.01 random:0.01 random:0.1 \
        --out docs/results/accuracy_vs_cost.json

Every cell trains the same `tiny` backbone with `hfs.train.Trainer` (the engine of
`hfs train`) from the same seed, for the same steps, on the same structured synthetic
identities (clusters of look-alike identities, `hfs.data.synthetic`), and reports

- closed-set top-1 on held-out views of the training identities, scored against ALL classes;
- verification accuracy (10-fold) on a .bin of pairs of identities never trained on
  (`hfs.data.synthetic.write_synthetic_bin`, half the negatives from the same cluster);
- median wall time per training step, and the sampler upkeep share (selection + index
  refresh in the training thread, and background build CPU) of the training wall time.

A cell is ``full`` or ``SAMPLER:RATE`` with sample_num = RATE x C. The images are generated
once into a uint8 cache (``--cache``) so image synthesis does not dominate the step time.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
import uuid
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Iterator

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from evidence_common import console_logging, script_parser, start_run, write_results  # noqa: E402

log = logging.getLogger("accuracy_vs_cost")


# ----------------------------------------------------------------------------- data


def _render_range(path: str, first: int, last: int, views: int, image_size: int, seed: int, cluster_size: int) -> None:
    from hfs.data.synthetic import SyntheticFaces

    faces = SyntheticFaces(seed, image_size, cluster_size, cache_size=4)
    out = np.load(path, mmap_mode="r+")
    for cls in range(first, last):
        for view in range(views):
            out[cls, view] = faces.image(cls, view)
    out.flush()


def pregenerate(cache_dir: Path, classes: int, views: int, image_size: int, seed: int = 0, cluster_size: int = 8,
                jobs: int = 2) -> Path:
    """``classes x views`` synthetic images as one uint8 .npy (generated once, then reused)."""
    path = cache_dir / f"synthetic_c{classes}_v{views}_s{image_size}_seed{seed}_cl{cluster_size}.npy"
    if path.exists():
        return path
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.{uuid.uuid4().hex}.partial.npy")  # two runs may render the same cache at once
    np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(classes, views, image_size, image_size, 3)).flush()
    bounds = np.linspace(0, classes, 8 * jobs + 1).astype(int)
    args = [(str(tmp), int(a), int(b), views, image_size, seed, cluster_size) for a, b in zip(bounds[:-1], bounds[1:])]
    if jobs <= 1:
        for a in args:
            _render_range(*a)
    else:
        with get_context("spawn").Pool(jobs) as pool:
            pool.starmap(_render_range, args)
    os.replace(tmp, path)  # a concurrent run's identical file may already be there
    return path


def verification_bin(cache_dir: Path, first_class: int, identities: int, pairs: int, image_size: int, seed: int = 0,
                     cluster_size: int = 8) -> Path:
    """A .bin of pairs over identities ``[first_class, first_class + identities)`` (cached)."""
    from hfs.data.synthetic import write_synthetic_bin

    path = cache_dir / f"verify_c{first_class}_n{identities}_p{pairs}_s{image_size}_seed{seed}.bin"
    if not path.exists():
        write_synthetic_bin(path, pairs, first_class, identities, image_size, seed, cluster_size=cluster_size)
    return path


class ArrayIdentities:
    """Training or held-out views of the pregenerated identities (same items as SyntheticIdentities).

    ``plan`` (:class:`hfs.data.plan.LabelPlan`) lays labels over the cached identities and views
    (duplicates, label noise, a long tail); by default each identity is one label with
    ``train_views`` training views and the rest of the cached views held out.
    ``class_stride`` > 1 keeps every stride-th label's held-out views only (at C = 100K scoring
    100K images against 100K classes would cost more than a cell's training).
    """

    def __init__(self, images: np.ndarray, train_views: int, split: str, image_size: int, seed: int = 0,
                 class_stride: int = 1, plan=None) -> None:
        from hfs.data.plan import LabelPlan
        from hfs.data.transforms import EvalTransform, TrainTransform

        self.images, self.split, self.seed, self.epoch, self.stride = images, split, seed, 0, class_stride
        self.plan = plan or LabelPlan(images.shape[0], train_views, val_views=images.shape[1] - train_views)
        self.transform = TrainTransform(image_size, True) if split == "train" else EvalTransform(image_size)
        if split == "train":
            self.indices = np.arange(self.plan.train_size)
        else:
            per = self.plan.val_views
            kept = np.arange(0, self.plan.num_classes, class_stride)
            self.indices = (kept[:, None] * per + np.arange(per)[None, :]).ravel()

    def __len__(self) -> int:
        return len(self.indices)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def labels(self) -> np.ndarray:
        return self.plan.items(self.split, self.indices)[2]

    def __getitem__(self, index: int):
        from PIL import Image

        identity, view, label = (int(a[0]) for a in self.plan.items(self.split, self.indices[[index]]))
        img = Image.fromarray(np.asarray(self.images[identity, view]))
        if self.split == "train":
            return self.transform(img, np.random.default_rng([self.seed, 4, index, self.epoch])), label
        return self.transform(img), label


# ----------------------------------------------------------------------------- one cell


def parse_cell(text: str, classes: int) -> tuple[str, int]:
    """``full`` -> ("full", C); ``annoy:0.01`` -> ("annoy", 0.01 x C)."""
    if text == "full":
        return "full", classes
    name, _, rate = text.partition(":")
    if not rate:
        raise SystemExit(f"cell '{text}': expected full or SAMPLER:RATE (e.g. annoy:0.01)")
    return name, max(1, round(float(rate) * classes))


class StepClock:
    """Trainer callback: wall time of each step, and the selector's upkeep at the last step."""

    def __init__(self, total_steps: int) -> None:
        self.total, self.last, self.step_s, self.upkeep = total_steps, time.perf_counter(), [], None
        self.timers: dict[str, float] = {}

    def __call__(self, trainer, step: int, record: dict) -> None:
        now = time.perf_counter()
        self.step_s.append(now - self.last)
        self.last = now
        if step == self.total and hasattr(trainer.fc, "index_stats"):  # the store's own index
            self.upkeep = trainer.fc.index_stats()
            self.timers = dict(trainer.fc.timers)
        elif step == self.total and getattr(trainer.fc, "selector", None) is not None:
            self.upkeep = trainer.fc.selector.upkeep()
            self.timers = dict(trainer.fc.timers)


def cell_config(args: argparse.Namespace, name: str, sample_num: int, output_dir: Path, bin_path: Path, seed: int):
    from hfs.config import apply_overrides, config_from_dict

    fc = {"mode": "full"} if name == "full" else {"mode": "sampled", "sample_num": sample_num}
    data = {
        "data": {"image_size": args.image_size, "num_workers": 0},
        "model": {"arch": "tiny", "embedding_size": args.dim},
        "head": {"type": "arcface", "scale": args.scale, "margin": args.margin},
        "fc": fc,
        "sampler": {"type": name if name != "full" else "annoy",
                    **({"annoy_trees": args.annoy_trees} if args.annoy_trees else {})},
        "optim": {"lr": args.lr, "schedule": "cosine", "warmup_steps": args.warmup},
        "train": {"output_dir": str(output_dir), "batch_size": args.batch, "max_steps": args.steps,
                  "checkpoint_every": 0, "log_every": 50, "seed": seed},
        "eval": {"bins": [str(bin_path)], "batch_size": 512, "num_workers": 0},
    }
    return config_from_dict(apply_overrides(data, args.set or []))  # the same --set as the hfs commands


def run_cell(args: argparse.Namespace, cell: str, images: np.ndarray, bin_path: Path, workdir: Path,
             seed: int) -> dict[str, Any]:
    """Train one cell from training seed ``seed`` and return its accuracy and cost numbers."""
    import shutil

    import torch

    from hfs.train.trainer import Trainer

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    name, sample_num = parse_cell(cell, args.classes)
    out_dir = workdir / f"{cell.replace(':', '_')}_seed{seed}"
    shutil.rmtree(out_dir, ignore_errors=True)
    cfg = cell_config(args, name, sample_num, out_dir, bin_path, seed)
    train = ArrayIdentities(images, args.train_views, "train", args.image_size, seed)
    val = ArrayIdentities(images, args.train_views, "val", args.image_size, seed, class_stride=args.val_stride)
    clock = StepClock(args.steps)
    t0 = time.perf_counter()
    result = Trainer(cfg, datasets=(train, val, args.classes), callbacks=[clock]).run()
    wall = time.perf_counter() - t0
    steps_s = clock.step_s[min(10, len(clock.step_s) // 2):]  # skip start-up steps (fewer in very short runs)
    train_s = sum(clock.step_s)
    row: dict[str, Any] = {
        "cell": cell, "seed": seed, "sampler": name, "sample_num": sample_num, "rate": sample_num / args.classes,
        "val_top1": result.val_top1, "verification": result.verification, "final_loss": result.loss,
        "final_train_acc": result.train_acc, "median_step_s": statistics.median(steps_s),
        "train_seconds": train_s, "run_seconds": wall,
    }
    if clock.upkeep is not None:
        # the index's own time in this process: queries and upkeep (the in-process store's, or the shard's)
        fg = float(clock.upkeep.get("fg_seconds", 0.0))
        row["upkeep"] = clock.upkeep
        row["upkeep_fg_share"] = fg / train_s
        row["upkeep_bg_cpu_share"] = float(clock.upkeep.get("bg_cpu_seconds", 0.0)) / train_s
        row["timers"] = clock.timers
    metrics = out_dir / "metrics.jsonl"
    if metrics.exists():
        row["metrics"] = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
    shutil.rmtree(out_dir, ignore_errors=True)
    log.info("%s seed %d: top1 %.4f verify %s step %.3f s", cell, seed,
             float("nan") if result.val_top1 is None else result.val_top1,
             result.verification, row["median_step_s"])
    return row


def _run_cell_from_file(args: argparse.Namespace, cell: str, images_path: Path, bin_path: Path, workdir: Path,
                        seed: int) -> dict[str, Any]:
    console_logging()
    return run_cell(args, cell, np.load(images_path, mmap_mode="r"), bin_path, workdir, seed)


def run_cells(args: argparse.Namespace, todo: list[tuple[str, int]], images_path: Path, bin_path: Path,
              workdir: Path) -> Iterator[dict[str, Any]]:
    """Each (cell, seed)'s row as it finishes: one after the other, or ``--parallel`` at a time.

    Parallel cells run in spawned processes of ``--threads`` torch threads each, so every
    cell of a run shares the box the same way (its step times are comparable with each
    other, not with a run of another ``--parallel``).
    """
    if args.parallel <= 1:
        for cell, seed in todo:
            yield run_cell(args, cell, np.load(images_path, mmap_mode="r"), bin_path, workdir, seed)
        return
    from concurrent.futures import ProcessPoolExecutor, as_completed

    with ProcessPoolExecutor(args.parallel, mp_context=get_context("spawn")) as pool:
        futures = [pool.submit(_run_cell_from_file, args, cell, images_path, bin_path, workdir, seed)
                   for cell, seed in todo]
        for future in as_completed(futures):
            yield future.result()


def previous_run(path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The rows of an earlier run's results file and the contexts (commands, dates) they came from (``--resume``)."""
    if not path.exists():
        return [], []
    data = json.loads(path.read_text())
    earlier = data["context"].pop("earlier_runs", [])
    return list(data["results"]), earlier + [data["context"]]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = script_parser(__doc__)
    p.add_argument("--classes", type=int, default=10_000, help="training identities C")
    p.add_argument("--cells", nargs="+", default=["full", "annoy:0.01", "annoy:0.1", "hnsw:0.01", "exact:0.01",
                                                  "random:0.01", "random:0.1"], help="full or SAMPLER:RATE")
    p.add_argument("--train-views", type=int, default=4, help="training images per identity")
    p.add_argument("--val-views", type=int, default=1, help="held-out images per identity (closed-set top-1)")
    p.add_argument("--verify-identities", type=int, default=1000, help="held-out identities of the .bin")
    p.add_argument("--verify-pairs", type=int, default=2000, help="pairs in the verification .bin")
    p.add_argument("--image-size", type=int, default=32, help="image size")
    p.add_argument("--dim", type=int, default=128, help="embedding size")
    p.add_argument("--batch", type=int, default=64, help="batch size")
    p.add_argument("--steps", type=int, default=1500, help="training steps of every cell")
    p.add_argument("--lr", type=float, default=0.1, help="base learning rate (cosine schedule)")
    p.add_argument("--warmup", type=int, default=100, help="warm-up steps")
    p.add_argument("--scale", type=float, default=32.0, help="ArcFace scale s")
    p.add_argument("--margin", type=float, default=0.3, help="ArcFace margin m")
    p.add_argument("--annoy-trees", type=int, default=0, help="annoy trees (0 = the config default)")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated identities and .bin")
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="training seeds, every cell runs once per seed (default: --seed)")
    p.add_argument("--val-stride", type=int, default=1,
                   help="score the held-out views of every N-th identity only (top-1 is still over all C classes)")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                   help="config override for every cell, as `hfs train --set` (repeatable)")
    p.add_argument("--parallel", type=int, default=1,
                   help="cells trained at the same time, each in its own process (2 uses both cores of a 2-core box)")
    p.add_argument("--resume", action="store_true",
                   help="keep the (cell, seed) results already in --out and run only the missing ones")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0 = torch default)")
    p.add_argument("--jobs", type=int, default=2, help="processes generating the image cache")
    p.add_argument("--cache", default="benchmarks/.cache", help="folder of the generated images and .bin")
    p.add_argument("--out", default="docs/results/accuracy_vs_cost.json", help="JSON results file (rewritten after each cell)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    context = start_run(args)
    cache = Path(args.cache)
    t0 = time.perf_counter()
    images_path = pregenerate(cache, args.classes, args.train_views + args.val_views, args.image_size, args.seed,
                              jobs=args.jobs)
    bin_path = verification_bin(cache, args.classes, args.verify_identities, args.verify_pairs, args.image_size,
                                args.seed)
    log.info("data ready in %.0f s", time.perf_counter() - t0)
    rows, earlier = previous_run(Path(args.out)) if args.resume else ([], [])
    if earlier:
        context["earlier_runs"] = earlier
    done = {(r["cell"], r.get("seed", args.seed)) for r in rows}
    todo = [(cell, seed) for seed in args.seeds or [args.seed] for cell in args.cells if (cell, seed) not in done]
    for cell, seed in sorted(done):
        log.info("%s seed %d: kept from %s", cell, seed, args.out)
    order = {cell: i for i, cell in enumerate(args.cells)}
    for row in run_cells(args, todo, images_path, bin_path, cache / "runs"):
        rows.append(row)
        rows.sort(key=lambda r: (order.get(r["cell"], len(order)), r.get("seed", args.seed)))
        write_results(args.out, context, rows)  # after every cell: a cut-short run keeps what it measured
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
