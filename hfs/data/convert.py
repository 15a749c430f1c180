"""`hfs convert`: InsightFace ``.rec`` <-> image tree + lists, losslessly and in parallel.

rec -> images writes each record's stored bytes unchanged (no decode, no re-encode) to
``images/<label>/<key>.<ext>``, the extension taken from the bytes' magic, each file through a
temp file + rename: a killed run leaves only complete files, and ``--resume`` skips them. The
lists and the ``property`` copy are written last, atomically, so they never describe a
half-converted tree. Workers are processes, each converting a slice of records from its own
mmap of the ``.rec``; offsets come from the parent, so no worker re-reads the index.

images -> rec packs a tree or the lists back into the InsightFace layout, bytes unchanged, so
rec -> images -> rec -> images is byte-identical with identical labels.
"""

from __future__ import annotations

import logging
import mmap
import time
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from hfs.data.filelist import (IMAGE_SUFFIXES, image_extension, read_image_list, split_per_identity,
                               write_image_list)
from hfs.data.recordio import (InsightFaceWriter, RecordFile, decode_record, read_layout, read_property,
                               unpack, write_property)
from hfs.utils.atomic import atomic_write_bytes, atomic_write_text
from hfs.utils.errors import HfsError

log = logging.getLogger(__name__)

TRAIN_LIST, VAL_LIST, PROPERTY, CLASSES = "train_list.txt", "val_list.txt", "property", "classes.txt"
_CHUNK = 1024  # records per worker task


@dataclass
class ConvertSummary:
    images: int
    identities: int
    bytes: int
    seconds: float
    skipped: int = 0
    val_images: int = 0
    output: str = ""

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else float("inf")

    def describe(self) -> str:
        text = (f"{self.images} images of {self.identities} identities, {self.bytes / 1e6:.1f} MB, "
                f"in {self.seconds:.1f} s ({self.images_per_second:.0f} images/s) -> {self.output}")
        if self.skipped:
            text += f"; {self.skipped} already complete (resumed)"
        if self.val_images:
            text += f"; {self.val_images} held out in {VAL_LIST}"
        return text


# --------------------------------------------------------------------------- rec -> images


def _convert_slice(rec_path: str, out_folder: str, keys: np.ndarray, offsets: np.ndarray, labels: np.ndarray,
                   check_labels: bool, resume: bool) -> tuple[list[str], int, int]:
    """Write one slice of records as image files; returns (relative paths, bytes, files skipped)."""
    rels: list[str] = []
    total = skipped = 0
    out = Path(out_folder)
    with open(rec_path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        for key, offset, label in zip(keys.tolist(), offsets.tolist(), labels.tolist()):
            where = f"{rec_path} record {key} at byte offset {offset}"
            header, data = unpack(decode_record(buf, offset, rec_path)[0], where)
            if check_labels and header.label != label:
                raise HfsError(f"{where}: header label {header.label:g} disagrees with its identity range "
                               f"(label {label})")
            ext = image_extension(data)
            if ext is None:
                raise HfsError(f"{where}: payload is not a JPEG/PNG/BMP/GIF/WebP image "
                               f"(starts with {bytes(data[:8]).hex()})")
            rel = f"images/{label}/{key}.{ext}"
            target = out / rel
            if resume and target.is_file() and target.stat().st_size == len(data):
                skipped += 1
            else:
                atomic_write_bytes(target, data, fsync=False)
            rels.append(rel)
            total += len(data)
    return rels, total, skipped


def _slices(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


def _pool_context():
    """fork where the OS has it (workers start in milliseconds), else spawn.

    The pool is started before the progress bar's refresh thread exists, so nothing forks a
    process that holds another thread's lock.
    """
    import multiprocessing

    return get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")


def _run_slices(jobs: list[tuple], workers: int, bar_title: str) -> list[tuple[list[str], int, int]]:
    """Run :func:`_convert_slice` over jobs in order (in-process for one worker, else a process
    pool) under a progress bar."""
    from hfs.utils.log import progress

    total = sum(len(job[2]) for job in jobs)
    info = f"{workers} worker{'s' if workers > 1 else ''}"
    if workers <= 1:
        results = []
        with progress() as bar:
            task = bar.add_task(bar_title, total=total, info=info)
            for job in jobs:
                results.append(_convert_slice(*job))
                bar.advance(task, len(job[2]))
        return results
    results: list = [None] * len(jobs)
    with ProcessPoolExecutor(workers, mp_context=_pool_context()) as pool:
        futures: dict[Future, int] = {pool.submit(_convert_slice, *job): i for i, job in enumerate(jobs)}
        try:
            with progress() as bar:
                task = bar.add_task(bar_title, total=total, info=info)
                for future in as_completed(futures):
                    i = futures[future]
                    results[i] = future.result()
                    bar.advance(task, len(jobs[i][2]))
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    return results


def _remove_stale_temps(images_dir: Path) -> int:
    """Delete temp files a killed run left behind (complete files were renamed into place)."""
    removed = 0
    if images_dir.is_dir():
        for label_dir in images_dir.iterdir():
            if label_dir.is_dir():
                for tmp in label_dir.glob(".*.tmp"):
                    tmp.unlink(missing_ok=True)
                    removed += 1
    return removed


def _copy_or_make_property(in_folder: Path, out_folder: Path, num_classes: int, first_image: Path | None) -> None:
    src = in_folder / PROPERTY
    if src.is_file():
        atomic_write_bytes(out_folder / PROPERTY, src.read_bytes())
    elif first_image is not None:
        from PIL import Image

        with Image.open(first_image) as img:
            width, height = img.size
        write_property(out_folder / PROPERTY, num_classes, height, width)


def rec_to_images(in_folder: str | Path, out_folder: str | Path, val_ratio: float = 0.05, seed: int = 0,
                  workers: int = 1, resume: bool = False, rec_name: str = "train") -> ConvertSummary:
    """Unpack ``<in>/<rec_name>.rec`` into ``<out>/images/<label>/<key>.<ext>`` plus the lists."""
    start = time.perf_counter()
    in_folder, out_folder = Path(in_folder), Path(out_folder)
    rec_path, idx_path = in_folder / f"{rec_name}.rec", in_folder / f"{rec_name}.idx"
    if not rec_path.is_file():
        raise HfsError(f"RecordIO file not found: {rec_path}")
    if not idx_path.is_file():
        raise HfsError(f"index not found: {idx_path} (keys of an InsightFace .rec live in its .idx)")
    split_per_identity(np.zeros(0, np.int64), val_ratio, seed)  # validate the ratio before any work
    rec = RecordFile(rec_path, idx_path)
    layout = read_layout(rec)
    if len(layout.image_keys) == 0:
        raise HfsError(f"{rec_path} holds no images")
    offsets = rec.offsets_of(layout.image_keys)
    jobs = [(str(rec_path), str(out_folder), layout.image_keys[s], offsets[s], layout.labels[s],
             layout.is_insightface, resume) for s in _slices(len(offsets), _CHUNK)]
    out_folder.mkdir(parents=True, exist_ok=True)
    if resume and (stale := _remove_stale_temps(out_folder / "images")):
        log.info("removed %d temp files of an interrupted run", stale)
    results = _run_slices(jobs, workers, "rec -> images")
    rels = [rel for part in results for rel in part[0]]
    is_val = split_per_identity(layout.labels, val_ratio, seed)
    write_image_list(out_folder / TRAIN_LIST, [r for r, v in zip(rels, is_val) if not v], layout.labels[~is_val])
    write_image_list(out_folder / VAL_LIST, [r for r, v in zip(rels, is_val) if v], layout.labels[is_val])
    _copy_or_make_property(in_folder, out_folder, layout.num_classes, out_folder / rels[0])
    return ConvertSummary(images=len(rels), identities=int(len(np.unique(layout.labels))),
                          bytes=sum(part[1] for part in results), seconds=time.perf_counter() - start,
                          skipped=sum(part[2] for part in results), val_images=int(is_val.sum()),
                          output=str(out_folder))


# --------------------------------------------------------------------------- images -> rec


def _natural_key(name: str) -> tuple:
    stem = name.rsplit("/", 1)[-1].rsplit(".", 1)[0]
    return (0, int(stem), name) if stem.isdigit() else (1, 0, name)


def _entries_from_lists(in_folder: Path) -> list[tuple[str, int]]:
    entries: dict[str, int] = {}
    for name in (TRAIN_LIST, VAL_LIST):
        path = in_folder / name
        if not path.is_file():
            continue
        paths, labels = read_image_list(path)
        for rel, label in zip(paths, labels.tolist()):
            if entries.setdefault(rel, label) != label:
                raise HfsError(f"{path}: {rel} is listed twice with different labels")
    return list(entries.items())


def _entries_from_tree(in_folder: Path) -> tuple[list[tuple[str, int]], list[str] | None]:
    """Images under ``<in>/images/<class>/`` (or ``<in>/<class>/``); numeric class names are labels,
    other names are numbered in sorted order (the names are returned to be saved)."""
    base = in_folder / "images" if (in_folder / "images").is_dir() else in_folder
    class_dirs = sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise HfsError(f"{in_folder}: no {TRAIN_LIST} and no class folders of images")
    numeric = all(p.name.isdigit() for p in class_dirs)
    names = None if numeric else [p.name for p in class_dirs]
    entries = []
    for i, folder in enumerate(class_dirs):
        label = int(folder.name) if numeric else i
        for file in folder.iterdir():
            if file.is_file() and file.suffix.lower() in IMAGE_SUFFIXES and not file.name.startswith("."):
                entries.append((str(file.relative_to(in_folder)), label))
    return entries, names


def _read_in_order(paths: Sequence[Path], workers: int, window: int = 256) -> Iterator[bytes]:
    """File contents in order, read ahead by a few threads (helps on network file systems)."""
    with ThreadPoolExecutor(max(1, workers)) as pool:
        for start in range(0, len(paths), window):
            yield from pool.map(Path.read_bytes, paths[start:start + window])


def images_to_rec(in_folder: str | Path, out_folder: str | Path, workers: int = 1,
                  rec_name: str = "train") -> ConvertSummary:
    """Pack ``<in>``'s lists (or its class folders) into an InsightFace ``<out>/<rec_name>.rec/.idx``."""
    from PIL import Image

    from hfs.utils.log import progress

    start = time.perf_counter()
    in_folder, out_folder = Path(in_folder), Path(out_folder)
    if not in_folder.is_dir():
        raise HfsError(f"input folder not found: {in_folder}")
    class_names = None
    if (in_folder / TRAIN_LIST).is_file():
        entries = _entries_from_lists(in_folder)
    else:
        entries, class_names = _entries_from_tree(in_folder)
    if not entries:
        raise HfsError(f"{in_folder}: no images to pack")
    entries.sort(key=lambda e: (e[1], _natural_key(e[0])))
    paths = [in_folder / rel for rel, _ in entries]
    missing = next((p for p in paths if not p.is_file()), None)
    if missing is not None:
        raise HfsError(f"image not found: {missing}")
    out_folder.mkdir(parents=True, exist_ok=True)
    total = 0
    with progress() as bar:
        task = bar.add_task("images -> rec", total=len(entries), info="")
        with InsightFaceWriter(out_folder / f"{rec_name}.rec", out_folder / f"{rec_name}.idx") as writer:
            for (rel, label), data in zip(entries, _read_in_order(paths, workers)):
                if image_extension(data) is None:
                    raise HfsError(f"{in_folder / rel}: not a JPEG/PNG/BMP/GIF/WebP image")
                writer.add(label, data)
                total += len(data)
                bar.advance(task)
            num_classes = writer.num_classes
    if (in_folder / PROPERTY).is_file():
        _, height, width = read_property(in_folder / PROPERTY)
    else:
        with Image.open(paths[0]) as img:
            width, height = img.size
    write_property(out_folder / PROPERTY, num_classes, height, width)
    if class_names is not None:
        atomic_write_text(out_folder / CLASSES, "".join(f"{i}\t{n}\n" for i, n in enumerate(class_names)))
    return ConvertSummary(images=len(entries), identities=len({label for _, label in entries}), bytes=total,
                          seconds=time.perf_counter() - start, output=str(out_folder / f"{rec_name}.rec"))
