"""Images/s of `hfs convert` (stored bytes, no re-encode) against a decode + re-encode conversion.

Both convert the same generated InsightFace .rec in the same run. The baseline does what the
old matplotlib-based tool did in spirit: decode every image and write it again as JPEG, one
process. Run:

    PYTHONPATH=. python benchmarks/bench_convert.py --classes 200 --images-per-class 20 --workers 1 2 --repeats 3
"""

from __future__ import annotations

import argparse
import io
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from hfs.data.convert import rec_to_images
from hfs.data.recordio import RecordFile, read_layout
from hfs.data.synthetic import write_synthetic_rec
from hfs.utils.atomic import atomic_write_bytes


def reencode_convert(rec_folder: Path, out_folder: Path, quality: int) -> tuple[int, float]:
    """The lossy baseline: decode each stored image with PIL and re-encode it as JPEG."""
    start = time.perf_counter()
    rec = RecordFile(rec_folder / "train.rec", rec_folder / "train.idx")
    layout = read_layout(rec)
    for key, label in zip(layout.image_keys.tolist(), layout.labels.tolist()):
        _, data = rec.read_image(key)
        with Image.open(io.BytesIO(data)) as img:
            buf = io.BytesIO()
            img.convert("RGB").save(buf, format="JPEG", quality=quality)
        atomic_write_bytes(out_folder / f"images/{label}/{key}.jpg", buf.getvalue(), fsync=False)
    return len(layout.image_keys), time.perf_counter() - start


def pixel_error(rec_folder: Path, out_folder: Path, samples: int = 50) -> float:
    """Mean absolute pixel difference between stored and re-encoded images (0 = lossless)."""
    rec = RecordFile(rec_folder / "train.rec", rec_folder / "train.idx")
    layout = read_layout(rec)
    errors = []
    for key, label in list(zip(layout.image_keys.tolist(), layout.labels.tolist()))[:samples]:
        a = np.asarray(Image.open(io.BytesIO(rec.read_image(key)[1])).convert("RGB"), np.int16)
        b = np.asarray(Image.open(out_folder / f"images/{label}/{key}.jpg").convert("RGB"), np.int16)
        errors.append(np.abs(a - b).mean())
    return float(np.mean(errors))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=200)
    parser.add_argument("--images-per-class", type=int, default=20)
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="hfs convert worker counts to time")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds; the median is reported")
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality of the re-encode baseline")
    parser.add_argument("--work-dir", type=Path, default=None, help="scratch folder (default: a temp dir)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(dir=args.work_dir) as tmp:
        tmp = Path(tmp)
        write_synthetic_rec(tmp / "rec", args.classes, args.images_per_class, args.image_size, seed=0)
        rounds: dict[str, list[float]] = {}
        for r in range(args.repeats):  # interleaved, so load on a shared machine hits all alike
            for workers in args.workers:
                summary = rec_to_images(tmp / "rec", tmp / f"hfs_j{workers}_{r}", val_ratio=0.05, workers=workers)
                rounds.setdefault(f"hfs convert -j{workers}", []).append(summary.images / summary.seconds)
            n, seconds = reencode_convert(tmp / "rec", tmp / f"reencode_{r}", args.quality)
            rounds.setdefault("decode + re-encode JPEG, 1 process", []).append(n / seconds)
        results = {name: float(np.median(rates)) for name, rates in rounds.items()}
        error = pixel_error(tmp / "rec", tmp / "reencode_0")
    base = results["decode + re-encode JPEG, 1 process"]
    print(f"{n} images of {args.image_size}x{args.image_size}, median of {args.repeats} rounds; re-encode mean abs pixel error {error:.2f}/255 "
          f"(hfs convert: 0, byte-identical)")
    print("| conversion | images/s | vs re-encode |\n|---|---|---|")
    for name, rate in results.items():
        print(f"| {name} | {rate:.0f} | {rate / base:.1f}x |")
    print(json.dumps({"images": n, "images_per_s": results, "reencode_pixel_error": error}))


if __name__ == "__main__":
    main()
