"""`hfs bench-loader`: images/s of the training loader, next to a bare decode loop.

The loader measured is the trainer's own: the `.rec` dataset of ``data.source=rec``
(:class:`~hfs.data.datasets.RecDataset`: read the record, decode the JPEG, random flip,
resize when needed, normalise to a tensor) behind :class:`~hfs.train.data_order.BatchStream`
(DataLoader, seeded order, default collate), for each decoder and number of workers.
The bare loop decodes the same records' bytes, already in memory, in one process with
nothing else: the ceiling a decoder sets. The data is a generated 112x112 JPEG set
(`hfs make-synthetic`'s identities) unless ``--data`` names a folder with train.rec/.idx.

What the numbers are for: whether the loader keeps up with the step rate the sampled
classifier reaches (docs/benchmarks.md records both), and what a faster decoder buys.
"""

from __future__ import annotations

import datetime as _dt
import io
import logging
import os
import platform
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger(__name__)


@dataclass
class LoaderBenchSettings:
    """What to measure; the defaults are what docs/benchmarks.md quotes."""

    data: Path | None = None  # folder with train.rec/.idx; None = generate
    images: int = 4096  # generated images (20 per identity)
    image_size: int = 112
    batch_size: int = 128
    batches: int = 20  # measured batches per (decoder, workers), after the first
    workers: list[int] = field(default_factory=lambda: [0, 1, 2])
    decoders: list[str] = field(default_factory=lambda: ["pil", "simplejpeg"])
    decode_images: int = 2000  # images of the bare decode loop
    seed: int = 0


def _context() -> dict[str, Any]:
    """When and where it ran, with the library versions that decide the numbers."""
    import PIL
    import torch

    versions = {"torch": torch.__version__, "pillow": PIL.__version__}
    try:
        import simplejpeg

        versions["simplejpeg"] = simplejpeg.__version__
    except ImportError:
        pass
    return {"date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
            "cpus": os.cpu_count(), "loadavg_start": list(os.getloadavg()), "machine": platform.machine(),
            "python": platform.python_version(), "torch_threads": torch.get_num_threads(), "versions": versions}


def available_decoders(wanted: list[str]) -> tuple[list[str], list[str]]:
    """(decoders to measure, those skipped because not installed); an unknown name is an error."""
    from hfs.data.transforms import DECODERS
    from hfs.utils.errors import HfsError

    unknown = [d for d in wanted if d not in DECODERS]
    if unknown:
        raise HfsError(f"--decoders: unknown decoder {unknown[0]!r}; one of {', '.join(DECODERS)}")
    usable, skipped = [], []
    for name in wanted:
        try:
            if name == "simplejpeg":
                import simplejpeg  # noqa: F401
            usable.append(name)
        except ImportError:
            skipped.append(name)
    return usable, skipped


def _generate(folder: Path, images: int, image_size: int, seed: int) -> Path:
    from hfs.data.synthetic import write_synthetic_rec

    per_class = 20
    classes = max(1, -(-images // per_class))
    write_synthetic_rec(folder, classes, per_class, image_size, seed, fmt="jpeg")
    return folder


def _train_dataset(root: Path, image_size: int, decoder: str, seed: int):
    """The trainer's dataset for ``data.source=rec`` at ``root`` with this decoder."""
    from hfs.config import load_config
    from hfs.data.datasets import build_datasets

    cfg = load_config(None, ["data.source=rec", f"data.root={root}", f"data.image_size={image_size}",
                             f"data.decoder={decoder}", f"train.seed={seed}"])
    train, _val, _classes = build_datasets(cfg)
    return train


def time_decode_loop(blobs: list[bytes], decoder: str) -> dict[str, float]:
    """Images/s of decoding ``blobs`` to RGB arrays in one process, nothing else."""
    import numpy as np
    from PIL import Image

    if decoder == "simplejpeg":
        import simplejpeg

        def decode(b: bytes):
            return simplejpeg.decode_jpeg(b, colorspace="RGB")
    else:
        def decode(b: bytes):
            with Image.open(io.BytesIO(b)) as img:
                return np.asarray(img.convert("RGB"))

    decode(blobs[0])  # first-call setup out of the timing
    start = time.perf_counter()
    for b in blobs:
        decode(b)
    seconds = time.perf_counter() - start
    return {"decoder": decoder, "images": len(blobs), "seconds": seconds, "images_per_s": len(blobs) / seconds}


def time_loader(dataset, batch_size: int, workers: int, batches: int, seed: int) -> dict[str, float]:
    """Images/s of the training loader: first batch (worker start-up) apart, then ``batches`` batches."""
    from hfs.train.data_order import BatchStream

    stream = BatchStream(dataset, batch_size, seed, workers)
    try:
        start = time.perf_counter()
        images, _labels = stream.next()
        first = time.perf_counter() - start
        shape = list(images.shape)
        start = time.perf_counter()
        for _ in range(batches):
            stream.next()
        seconds = time.perf_counter() - start
    finally:
        stream.close()
    n = batches * batch_size
    return {"workers": workers, "batch_size": batch_size, "batches": batches, "images": n,
            "first_batch_s": first, "seconds": seconds, "images_per_s": n / seconds, "batch_shape": shape}


def run_loader_bench(s: LoaderBenchSettings, on_progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Every measurement of :class:`LoaderBenchSettings`, as one JSON-ready dict."""
    decoders, skipped = available_decoders(s.decoders)
    report: dict[str, Any] = {"context": _context(), "settings": {**asdict(s), "data": str(s.data or "generated")},
                              "skipped_decoders": skipped, "decode_loop": [], "loader": []}
    say = on_progress or (lambda text: None)
    with tempfile.TemporaryDirectory(prefix="hfs-bench-loader-") as tmp:
        root = Path(s.data) if s.data is not None else _generate(Path(tmp), s.images, s.image_size, s.seed)
        probe = _train_dataset(root, s.image_size, "pil", s.seed)  # checks the folder as the trainer does
        if len(probe) < s.batch_size:
            from hfs.utils.errors import HfsError

            raise HfsError(f"{root}: {len(probe)} images, fewer than one batch of --batch-size {s.batch_size}")
        if len(probe) < s.batch_size * (s.batches + 1):
            log.info("%d images hold fewer than %d batches of %d: the loader rolls over into the next epoch",
                     len(probe), s.batches + 1, s.batch_size)
        blobs = [probe.rec.read_image(int(k))[1] for k in probe.keys[:s.decode_images]]
        report["dataset"] = {"images": len(probe), "bytes_per_image": sum(map(len, blobs)) / max(len(blobs), 1)}
        for decoder in decoders:
            say(f"bare decode loop, {decoder}")
            report["decode_loop"].append(time_decode_loop(blobs, decoder))
        for decoder in decoders:
            dataset = _train_dataset(root, s.image_size, decoder, s.seed)
            for workers in s.workers:
                say(f"training loader, {decoder}, {workers} workers")
                report["loader"].append({"decoder": decoder, **time_loader(dataset, s.batch_size, workers,
                                                                            s.batches, s.seed)})
    report["context"]["loadavg_end"] = list(os.getloadavg())
    return report


def render(report: dict[str, Any], console) -> None:
    """Two rich tables: the bare decode loops, then the loader per decoder and worker count."""
    from rich.table import Table

    base = {r["decoder"]: r["images_per_s"] for r in report["decode_loop"]}
    ds = report["dataset"]
    table = Table(title=f"bare decode loop: {ds['images']} JPEG images in the set, "
                        f"{ds['bytes_per_image'] / 1024:.1f} KiB each, one process")
    for col in ("decoder", "images", "images/s"):
        table.add_column(col, justify="left" if col == "decoder" else "right")
    for r in report["decode_loop"]:
        table.add_row(r["decoder"], str(r["images"]), f"{r['images_per_s']:.0f}")
    console.print(table)
    table = Table(title="training loader (decode + flip + normalise + collate), batches of "
                        f"{report['settings']['batch_size']}")
    for col in ("decoder", "workers", "images/s", "vs bare decode loop", "first batch (s)"):
        table.add_column(col, justify="left" if col == "decoder" else "right")
    for r in report["loader"]:
        table.add_row(r["decoder"], str(r["workers"]), f"{r['images_per_s']:.0f}",
                      f"{r['images_per_s'] / base[r['decoder']]:.2f}x", f"{r['first_batch_s']:.2f}")
    console.print(table)
    if report["skipped_decoders"]:
        console.print(f"not installed, skipped: {', '.join(report['skipped_decoders'])} "
                      "(pip install simplejpeg)")
