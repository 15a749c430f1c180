"""Accuracy of HF-softmax vs the full softmax vs random negatives, same steps, same data.

Trains three runs on the structured synthetic identities (clustered look-alikes, so hard
negatives exist; rendered once into an InsightFace .rec) with identical backbone, head, schedule and steps, and reports validation
top-1 over all classes plus verification accuracy on held-out identities:

    python benchmarks/bench_accuracy.py --classes 10000 --steps 3000 --out runs/bench_acc

The issue's target is C=100K; this script takes any C. Results go to <out>/results.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from hfs.config import load_config
from hfs.data.bins import write_bin
from hfs.data.synthetic import synthetic_verification_pairs, write_synthetic_rec
from hfs.train.trainer import train
from hfs.utils.atomic import atomic_write_text
from hfs.utils.log import make_console, setup_logging

RUNS = {"full": ["fc.mode=full"],
        "hf-annoy": ["fc.mode=sampled", "sampler.type=annoy"],
        "random": ["fc.mode=sampled", "sampler.type=random"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--classes", type=int, default=10000)
    p.add_argument("--images-per-class", type=int, default=8, help="one of them is held out for validation")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--sample-num", type=int, default=1000)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--runs", default=",".join(RUNS), help="comma-separated subset of " + ", ".join(RUNS))
    p.add_argument("--out", type=Path, default=Path("runs/bench_accuracy"))
    args = p.parse_args()
    setup_logging(0)
    bin_path, rec_dir = args.out / "heldout.bin", args.out / "data"
    if not (rec_dir / "train.idx").exists():  # render once; every run then decodes the same JPEGs
        write_synthetic_rec(rec_dir, args.classes, args.images_per_class, args.image_size)
    if not bin_path.exists():
        images, issame = synthetic_verification_pairs(2000, first_class=args.classes, num_classes=500,
                                                      image_size=args.image_size)
        write_bin(bin_path, images, issame)
    common = [
        "data.source=rec", f"data.root={rec_dir}", f"data.rec_val_ratio={1 / args.images_per_class}",
        f"data.image_size={args.image_size}",
        "data.num_workers=1", "model.arch=tiny", "model.embedding_size=128",
        "head.type=arcface", "head.scale=32", "head.margin=0.3", f"fc.sample_num={args.sample_num}",
        "sampler.refresh=interval", "sampler.interval=100", "optim.lr=0.1", "optim.schedule=cosine",
        f"optim.warmup_steps={args.steps // 20}", f"train.batch_size={args.batch}", f"train.max_steps={args.steps}",
        "train.checkpoint_every=0", "train.log_every=50", f"eval.bins=[{bin_path}]", "eval.num_workers=0",
    ]
    results = {}
    for name in args.runs.split(","):
        cfg = load_config(None, common + RUNS[name] + [f"train.output_dir={args.out / name}"])
        r = train(cfg)
        if r.interrupted:  # SIGINT/SIGTERM: the run checkpointed; do not start the next one
            raise SystemExit(f"{name} interrupted at step {r.steps}; results so far are not written")
        results[name] = {"val_top1": r.val_top1, "verification": r.verification.get("heldout"),
                         "seconds": r.seconds, "steps": r.steps, "active_classes": r.active_classes}
        make_console().print(name, results[name])
    atomic_write_text(args.out / "results.json", json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                             "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
