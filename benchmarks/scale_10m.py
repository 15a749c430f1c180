"""Sampled training with 10,000,000 classes on one small CPU box, weights in `hfs serve-params`.

    PYTHONPATH=. python benchmarks/scale_10m.py --classes 10000000 --dim 128 --steps 600 \
        --out docs/results/scale_10m.json

What runs:

- a `hfs serve-params` process (started and stopped here) holds the C x D classifier and its
  momentum and applies the sparse SGD updates;
- `hfs.train.Trainer` (the engine of `hfs train`) trains the `tiny` backbone with
  `fc.mode=sampled` against it, over the loopback client;
- the data: synthetic identities (`hfs.data.synthetic.SyntheticFaces`) whose labels are
  ``--identities`` class ids spread evenly over the whole range [0, C) (label i is generator
  identity i, so images are generated on the fly per (class, view)), ``--images`` views each,
  so identities repeat within the run and the loss can fall in a few hundred steps; the
  active set's fill comes from all C classes. The held-out views of ``--val-identities`` of
  them are scored top-1 against ALL C classes at the end (the trainer scans the matrix in
  chunks from the server).

Recorded: per-step wall time (median), the trainer's metrics (loss, accuracy, upkeep
share), peak RSS of the trainer process and of the server process, server matrix creation
time and the end-of-run store snapshot time (part of the final checkpoint).
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

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from evidence_common import script_parser, start_run, write_results  # noqa: E402

from hfs.utils.process import kill_if_running, peak_rss_mb, rss_mb, start_serve_params  # noqa: E402

log = logging.getLogger("scale_10m")


class SpreadIdentities:
    """Synthetic identities whose class ids are spread evenly over [0, num_classes).

    Same item format as `hfs.data.synthetic.SyntheticIdentities` (float tensor, int label);
    ``split="val"`` holds the views after the training ones of every ``val_stride``-th identity.
    """

    def __init__(self, num_classes: int, identities: int, images_per_class: int, image_size: int, seed: int = 0,
                 split: str = "train", val_stride: int = 1) -> None:
        from hfs.data.synthetic import SyntheticFaces
        from hfs.data.transforms import EvalTransform, TrainTransform

        ids = np.linspace(0, num_classes - 1, identities).round().astype(np.int64)
        self.class_ids = ids if split == "train" else ids[::val_stride]
        self.per_class = images_per_class if split == "train" else 1
        self.first_view = 0 if split == "train" else images_per_class
        self.split, self.seed, self.epoch = split, seed, 0
        self.faces = SyntheticFaces(seed, image_size, cache_size=len(self.class_ids))
        self.transform = TrainTransform(image_size, True) if split == "train" else EvalTransform(image_size)

    def __len__(self) -> int:
        return len(self.class_ids) * self.per_class

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def labels(self) -> np.ndarray:
        return np.repeat(self.class_ids, self.per_class)

    def __getitem__(self, index: int):
        from PIL import Image

        k, j = divmod(int(index), self.per_class)
        cls = int(self.class_ids[k])
        img = Image.fromarray(self.faces.image(cls, self.first_view + j))
        if self.split == "train":
            return self.transform(img, np.random.default_rng([self.seed, 4, index, self.epoch])), cls
        return self.transform(img), cls


def start_server(snapshot_dir: Path, log_path: Path, hugepages: bool) -> tuple[subprocess.Popen, str]:
    """`hfs serve-params` on a free 127.0.0.1 port as a child process (its log goes to log_path),
    and its address.

    NumPy madvises transparent huge pages (2 MiB) for large arrays; then the momentum, which
    is allocated zeroed and meant to be mapped only where rows are updated, becomes fully
    resident within ~100 steps of random negatives (each 2 MiB page holds 4096 rows of
    D=128). ``hugepages=False`` sets NUMPY_MADVISE_HUGEPAGE=0 for the server so only the
    4 KiB pages of updated rows are mapped.
    """
    return start_serve_params(snapshot_dir, args=["--set", "paramserver.max_message_mb=4096"],
                              env=None if hugepages else {"NUMPY_MADVISE_HUGEPAGE": "0"},
                              stdout=log_path.open("w"), stderr=subprocess.STDOUT)


def train_config(args: argparse.Namespace, address: str, output_dir: Path):
    from hfs.config import config_from_dict

    return config_from_dict({
        "data": {"image_size": args.image_size, "num_workers": args.workers},
        "model": {"arch": "tiny", "embedding_size": args.dim},
        "head": {"type": "arcface", "scale": 32.0, "margin": 0.3},
        "fc": {"mode": "sampled", "sample_num": args.sample_num, "num_classes": args.classes},
        "sampler": {"type": args.sampler, "annoy_trees": args.annoy_trees},
        "paramserver": {"address": address, "timeout_s": 1800.0, "connect_timeout_s": 120.0},
        "optim": {"lr": args.lr, "schedule": "cosine", "warmup_steps": args.warmup},
        "train": {"output_dir": str(output_dir), "batch_size": args.batch, "max_steps": args.steps,
                  "checkpoint_every": 0, "log_every": args.log_every, "seed": 0},
    })


class StepRecorder:
    """Trainer callback: wall time per step and RSS of trainer and server every few steps."""

    def __init__(self, server_pid: int, every: int = 25) -> None:
        self.server_pid, self.every = server_pid, every
        self.last = time.perf_counter()
        self.step_s: list[float] = []
        self.records: list[dict] = []
        self.rss: list[dict] = []

    def __call__(self, trainer, step: int, record: dict) -> None:
        now = time.perf_counter()
        self.step_s.append(now - self.last)
        self.last = now
        if "loss" in record:
            self.records.append(dict(record))
        if step % self.every == 0:
            index = trainer.fc.index_stats() if hasattr(trainer.fc, "index_stats") else {}
            self.rss.append({"step": step, "trainer_rss_mb": rss_mb(),
                             "server_rss_mb": rss_mb(pid=self.server_pid),
                             "index_ready": bool(index.get("index_ready", False)),
                             "index_builds": int(index.get("builds", 0))})
        self.last = time.perf_counter()  # the stats round trip above is the benchmark's, not the step's


def wait_for_index(client, cfg, num_classes: int, timeout_s: float) -> dict[str, Any]:
    """Attach the index the trainer will ask for (same spec: the trainer's attach is then a no-op)
    and wait until the server has built it, so every timed step selects with it."""
    from hfs.fc.factories import MATRIX, attach_sampled_index, plan_classifier

    t0 = time.perf_counter()
    if not attach_sampled_index(cfg, client, num_classes, plan_classifier(cfg, num_classes, 0)):
        return {}
    next_note = t0 + 60
    while True:
        stats = client.index_stats(MATRIX)
        if stats.get("index_ready"):
            break
        if time.perf_counter() - t0 > timeout_s:
            raise SystemExit(f"the server's index was not ready after {timeout_s:.0f} s")
        if time.perf_counter() > next_note:
            log.info("waiting for the server's %s index: %.0f s", cfg.sampler.type, time.perf_counter() - t0)
            next_note += 60
        time.sleep(2.0)
    return {"index_build_wall_s": time.perf_counter() - t0, "index_build_cpu_s": stats.get("bg_cpu_seconds", 0.0)}


def run_scale(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Start the server, train, stop the server; everything measured on the way."""
    import torch

    from hfs.paramserver.client import ParamClient
    from hfs.train.trainer import Trainer

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    server, address = start_server(workdir / "store", workdir / "server.log", args.server_hugepages)
    out: dict[str, Any] = {"server_cmd": " ".join(server.args), "address": address}
    try:
        cfg = train_config(args, address, workdir / "run")
        train_ds = SpreadIdentities(args.classes, args.identities, args.images, args.image_size)
        val_ds = SpreadIdentities(args.classes, args.identities, args.images, args.image_size, split="val",
                                  val_stride=max(1, args.identities // args.val_identities))
        with ParamClient(address, timeout_s=1800.0, connect_timeout_s=120.0) as client:
            t0 = time.perf_counter()  # create here (what the trainer would do) to time it apart
            client.create("fc", args.classes, args.dim, init="gaussian", std=0.01, seed=0, exist_ok=True)
            out["create_s"] = time.perf_counter() - t0
            out["server_rss_after_create_mb"] = rss_mb(pid=server.pid)
            log.info("matrix %d x %d created in %.1f s; server RSS %.0f MiB", args.classes, args.dim, out["create_s"],
                     out["server_rss_after_create_mb"])
            if args.wait_index:
                out.update(wait_for_index(client, cfg, args.classes, args.wait_index_s))
                out["server_rss_with_index_mb"] = rss_mb(pid=server.pid)
                out["server_peak_rss_before_training_mb"] = rss_mb("VmHWM", pid=server.pid)
        recorder = StepRecorder(server.pid)
        trainer = Trainer(cfg, datasets=(train_ds, val_ds, args.classes), callbacks=[recorder])
        t0 = time.perf_counter()
        result = trainer.run()
        out["train_wall_s"] = time.perf_counter() - t0
        out["result"] = {k: getattr(result, k) for k in ("steps", "seconds", "loss", "train_acc", "val_top1",
                                                        "active_classes", "num_classes")}
        out["server_peak_rss_mb"] = rss_mb("VmHWM", pid=server.pid)
        out["trainer_peak_rss_mb"] = peak_rss_mb()
        timed = recorder.step_s[args.log_every:]  # the first steps include worker start-up
        out["median_step_s"] = statistics.median(timed)
        out["step_s_p10_p90"] = [float(np.percentile(timed, 10)), float(np.percentile(timed, 90))]
        out["log"] = recorder.records
        out["rss"] = recorder.rss
        metrics = workdir / "run" / "metrics.jsonl"
        if metrics.exists():
            out["metrics"] = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        with ParamClient(address, timeout_s=600.0) as client:
            client.shutdown()
        server.wait(600)
    finally:
        kill_if_running(server)
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = script_parser(__doc__)
    p.add_argument("--classes", type=int, default=10_000_000, help="classes C held by the server")
    p.add_argument("--dim", type=int, default=128, help="embedding size D")
    p.add_argument("--identities", type=int, default=8192, help="trained identities, spread over [0, C)")
    p.add_argument("--images", type=int, default=8, help="training views per identity")
    p.add_argument("--val-identities", type=int, default=512, help="identities whose held-out view is scored")
    p.add_argument("--image-size", type=int, default=32, help="image size of the tiny backbone")
    p.add_argument("--batch", type=int, default=256, help="batch size")
    p.add_argument("--sample-num", type=int, default=1000, help="active classes per step")
    p.add_argument("--sampler", default="random", help="sampler (annoy/hnsw need an index over all C rows)")
    p.add_argument("--annoy-trees", type=int, default=2, help="annoy trees when --sampler annoy")
    p.add_argument("--steps", type=int, default=600, help="training steps")
    p.add_argument("--wait-index", action=argparse.BooleanOptionalAction, default=False,
                   help="build the server's index before training, so every timed step selects with it")
    p.add_argument("--wait-index-s", type=float, default=3600.0, help="--wait-index: give up after this long")
    p.add_argument("--lr", type=float, default=0.1, help="base learning rate")
    p.add_argument("--warmup", type=int, default=50, help="warm-up steps")
    p.add_argument("--log-every", type=int, default=25, help="steps per metrics line")
    p.add_argument("--workers", type=int, default=1, help="DataLoader workers generating images")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads of the trainer (0 = default)")
    p.add_argument("--server-hugepages", action=argparse.BooleanOptionalAction, default=False,
                   help="let NumPy use transparent huge pages in the server (momentum then becomes fully resident)")
    p.add_argument("--workdir", default="", help="folder for the run and the server's snapshots (default: temp, removed)")
    p.add_argument("--out", default="docs/results/scale_10m.json", help="JSON results file")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    context = start_run(args)
    if args.workdir:
        workdir = Path(args.workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        results = run_scale(args, workdir)
    else:
        with tempfile.TemporaryDirectory(prefix="hfs-scale-") as tmp:
            results = run_scale(args, Path(tmp))
    log.info("wrote %s", write_results(args.out, context, results))


if __name__ == "__main__":
    main()
