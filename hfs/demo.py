"""`make demo`: the whole pipeline on generated identities, on CPU, in a few minutes.

1. write a few hundred synthetic identities as an InsightFace ``train.rec`` (+ ``.idx``,
   ``property``) and a verification ``.bin`` of held-out identities;
2. ``hfs convert`` the ``.rec`` into images + train/val lists;
3. train the tiny backbone with HF-softmax (``fc.mode=sampled``, the default sampler: exact
   nearest classes under the similarity ceiling, in-process weight store) from the converted list;
4. extract features of the ``.bin`` images with the trained checkpoint and verify them;
5. print a short summary.

Run as ``python -m hfs.demo --out runs/demo``; every step uses the library, not subprocesses.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import typer
from typing_extensions import Annotated

log = logging.getLogger("hfs.demo")


class DemoInterrupted(Exception):
    """SIGINT/SIGTERM stopped the training step (it wrote a checkpoint first)."""


@dataclass(frozen=True)
class DemoSizes:
    """How big the demo is; the defaults fit ~5 minutes on two busy CPU cores."""

    identities: int = 300
    images_per_identity: int = 24
    verify_identities: int = 60
    verify_pairs: int = 600
    image_size: int = 32
    steps: int = 400
    batch_size: int = 64
    sample_num: int = 64
    seed: int = 0


def make_dataset(out: Path, sizes: DemoSizes) -> tuple[Path, Path]:
    """The .rec of the training identities and the .bin of identities never trained on."""
    from hfs.data.bins import write_bin
    from hfs.data.synthetic import synthetic_verification_pairs, write_synthetic_rec

    rec_dir, bin_path = out / "rec", out / "verify.bin"
    write_synthetic_rec(rec_dir, sizes.identities, sizes.images_per_identity, sizes.image_size, seed=sizes.seed)
    images, issame = synthetic_verification_pairs(sizes.verify_pairs, first_class=sizes.identities,
                                                  num_classes=sizes.verify_identities,
                                                  image_size=sizes.image_size, seed=sizes.seed)
    write_bin(bin_path, images, issame)
    return rec_dir, bin_path


def demo_overrides(out: Path, sizes: DemoSizes, data_root: Path) -> list[str]:
    """The training config of the demo, as `--set` overrides (shown in the summary)."""
    return [
        "data.source=list", f"data.root={data_root}", f"data.image_size={sizes.image_size}", "data.num_workers=0",
        "model.arch=tiny", "model.embedding_size=64",
        "head.type=arcface", "head.scale=32", "head.margin=0.3",
        "fc.mode=sampled", f"fc.sample_num={sizes.sample_num}", "fc.init_std=0.01",
        "optim.lr=0.1", "optim.schedule=cosine", f"optim.warmup_steps={max(sizes.steps // 20, 1)}",
        "optim.weight_decay=0.0005",
        f"train.output_dir={out / 'train'}", f"train.batch_size={sizes.batch_size}", f"train.max_steps={sizes.steps}",
        f"train.checkpoint_every={max(sizes.steps // 4, 1)}", "train.log_every=20", f"train.seed={sizes.seed}",
        "eval.folds=10", "eval.num_workers=0",
    ]


def extract_and_verify(checkpoint: str | Path, bin_path: Path, features_out: Path) -> float:
    """What `hfs extract` + `hfs verify` do: features of the .bin images, then 10-fold accuracy."""
    from hfs.eval.evaluate import VerificationSet, verify_features
    from hfs.eval.extract import EncodedImages, extract_features, write_features
    from hfs.models.loading import load_backbone

    model, cfg = load_backbone(checkpoint)
    vset = VerificationSet.load(bin_path)
    feats = extract_features(model, EncodedImages(vset.images, cfg.data.image_size, source=str(bin_path)),
                             batch_size=256, show_progress=False)
    write_features(features_out, feats, {"checkpoint": str(checkpoint), "bin": str(bin_path)})
    return verify_features(feats, vset, folds=10).accuracy


def run_demo(out: Path, sizes: DemoSizes = DemoSizes()) -> dict:
    """Run the five steps; returns what the summary shows."""
    from hfs.config import load_config
    from hfs.data.convert import rec_to_images
    from hfs.eval.hooks import verification_hooks
    from hfs.train.trainer import train

    t0 = time.perf_counter()
    log.info("1/4 generating %d identities x %d images and %d verification pairs in %s",
             sizes.identities, sizes.images_per_identity, sizes.verify_pairs, out)
    rec_dir, bin_path = make_dataset(out, sizes)
    log.info("2/4 converting %s", rec_dir / "train.rec")
    converted = rec_to_images(rec_dir, out / "converted", val_ratio=0.1, seed=sizes.seed, workers=1)
    log.info("3/4 training with HF-softmax (%d of %d classes per step)", sizes.sample_num, sizes.identities)
    cfg = load_config(None, demo_overrides(out, sizes, out / "converted"))
    if (out / "train").exists():  # the demo's own previous run: start afresh
        shutil.rmtree(out / "train")
    result = train(cfg, hooks=verification_hooks(cfg))
    if result.interrupted:
        raise DemoInterrupted(f"training stopped at step {result.steps} of {sizes.steps}; continue it with "
                              f"`hfs train --resume {result.checkpoint}`, or run the demo again")
    log.info("4/4 extracting features of %s and verifying", bin_path.name)
    accuracy = extract_and_verify(result.checkpoint, bin_path, out / "verify_features.npy")
    return {"identities": sizes.identities, "train_images": converted.images - converted.val_images,
            "val_images": converted.val_images, "verify_pairs": sizes.verify_pairs,
            "verify_identities": sizes.verify_identities, "result": result, "verification": accuracy,
            "negatives": negatives_in_words(cfg.sampler),
            "seconds": time.perf_counter() - t0, "out": out}


def negatives_in_words(sampler) -> str:
    """How the run chose its negatives, for the summary: read from the config it trained with."""
    ceiling = " under the similarity ceiling" if sampler.ceiling == "positive" else ""
    return f"{sampler.type} negatives{ceiling}"


def print_summary(summary: dict, console=None) -> None:
    from rich.table import Table

    from hfs.utils.log import make_console

    r = summary["result"]
    table = Table(title="hfs demo", show_header=False)
    table.add_row("data", f"{summary['identities']} synthetic identities, {summary['train_images']} training / "
                          f"{summary['val_images']} validation images (InsightFace .rec -> hfs convert)")
    table.add_row("model", "tiny CNN, 64-d embedding, ArcFace (s=32, m=0.3)")
    table.add_row("classifier", f"HF-softmax: {r.active_classes} of {r.num_classes} classes per step "
                                f"({summary['negatives']}, in-process weight store)")
    table.add_row("training", f"{r.steps} steps in {r.seconds:.0f} s, last loss {r.loss:.3f}")
    table.add_row("validation top-1", f"{r.val_top1:.1%} (over all {r.num_classes} classes)"
                  if r.val_top1 is not None else "n/a")
    table.add_row("verification", f"{summary['verification']:.1%} on {summary['verify_pairs']} pairs of "
                                  f"{summary['verify_identities']} unseen identities (10-fold)")
    table.add_row("total time", f"{summary['seconds']:.0f} s")
    table.add_row("outputs", f"{summary['out']} (checkpoint {Path(r.checkpoint).name})")
    (console or make_console()).print(table)


def main(out: Annotated[Path, typer.Option("--out", help="Folder for the demo's data, run and features.")] = Path("runs/demo"),
         steps: Annotated[Optional[int], typer.Option("--steps", min=1, help="Training steps (default 400).")] = None) -> None:
    """Generate data, convert it, train with HF-softmax, verify, and summarise."""
    from dataclasses import replace

    from hfs.config import ConfigError
    from hfs.utils.errors import HfsError
    from hfs.utils.log import setup_logging

    setup_logging(0)
    sizes = DemoSizes() if steps is None else replace(DemoSizes(), steps=steps)
    try:
        print_summary(run_demo(out, sizes))
    except (ConfigError, HfsError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2)
    except DemoInterrupted as exc:
        typer.echo(f"interrupted: {exc}", err=True)
        raise typer.Exit(130)


if __name__ == "__main__":
    typer.run(main)
