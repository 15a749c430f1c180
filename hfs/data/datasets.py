"""Training/validation datasets: a file list, a .rec read directly, or synthetic identities.

Every dataset yields ``(float32 CxHxW tensor in [-1, 1], int label)`` through
:mod:`hfs.data.transforms`. Training augmentation draws from a generator seeded by
(seed, index, epoch), so a run is reproducible whatever the number of DataLoader workers.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from hfs.data.filelist import read_image_list, split_per_identity
from hfs.utils.errors import HfsError

log = logging.getLogger(__name__)


class _ImageDataset:
    """Shared item logic: load encoded bytes or a path, then the train or eval transform."""

    def __init__(self, labels: np.ndarray, image_size: int, train: bool, hflip: bool, seed: int,
                 decoder: str = "pil") -> None:
        from hfs.data.transforms import EvalTransform, TrainTransform, resolve_decoder

        self._labels = np.asarray(labels, dtype=np.int64)
        self.train = train
        self.seed = int(seed)
        self.epoch = 0
        self.decoder = resolve_decoder(decoder)
        self.transform = (TrainTransform(image_size, hflip, self.decoder) if train
                          else EvalTransform(image_size, self.decoder))

    def __len__(self) -> int:
        return len(self._labels)

    def labels(self) -> np.ndarray:
        return self._labels

    def set_epoch(self, epoch: int) -> None:
        """Vary the training augmentation between epochs."""
        self.epoch = int(epoch)

    def _load(self, index: int) -> Any:
        raise NotImplementedError

    def _describe(self, index: int) -> str:
        raise NotImplementedError

    def __getitem__(self, index: int):
        if not 0 <= index < len(self):
            raise IndexError(index)
        source = self._load(index)
        try:
            if self.train:
                x = self.transform(source, np.random.default_rng([self.seed, index, self.epoch]))
            else:
                x = self.transform(source)
        except (OSError, ValueError) as exc:  # PIL raises these for undecodable images
            raise HfsError(f"cannot decode {self._describe(index)}: {exc}") from None
        return x, int(self._labels[index])


class ImageListDataset(_ImageDataset):
    """Images named by a list file ("relative/path label" per line) under a root folder."""

    def __init__(self, list_path: str | Path, root: str | Path, image_size: int, train: bool = True,
                 hflip: bool = True, seed: int = 0, decoder: str = "pil") -> None:
        self.list_path = Path(list_path)
        self.root = Path(root)
        self.paths, labels = read_image_list(self.list_path)
        super().__init__(labels, image_size, train, hflip, seed, decoder)

    def _load(self, index: int) -> Path:
        path = self.root / self.paths[index]
        if not path.is_file():
            raise HfsError(f"image not found: {path} (listed in {self.list_path})")
        return path

    def _describe(self, index: int) -> str:
        return str(self.root / self.paths[index])


class RecDataset(_ImageDataset):
    """Images read straight from a ``.rec`` through its ``.idx``, no conversion needed.

    The :class:`~hfs.data.recordio.RecordFile` opens its mmap lazily in whichever process reads,
    and drops it when pickled, so DataLoader workers never share a file handle.
    """

    def __init__(self, rec, keys: Sequence[int], labels: np.ndarray, image_size: int, train: bool = True,
                 hflip: bool = True, seed: int = 0, decoder: str = "pil") -> None:
        self.rec = rec
        self.keys = np.asarray(keys, dtype=np.int64)
        super().__init__(labels, image_size, train, hflip, seed, decoder)

    def _load(self, index: int) -> bytes:
        return self.rec.read_image(int(self.keys[index]))[1]

    def _describe(self, index: int) -> str:
        key = int(self.keys[index])
        return f"{self.rec.rec_path} record {key} at byte offset {self.rec.offset_of(key)}"


# --------------------------------------------------------------------------- factory


def build_datasets(cfg) -> tuple[Any, Any | None, int]:
    """``(train_ds, val_ds or None, num_classes)`` for ``cfg.data.source``."""
    source = cfg.data.source
    if source == "synthetic":
        return _synthetic(cfg)
    if source == "list":
        return _from_lists(cfg)
    if source == "rec":
        return _from_rec(cfg)
    if source == "latent":
        return _latent(cfg)
    raise HfsError(f"data.source '{source}' is not one of synthetic, list, rec, latent")


def _regime(d):
    """The synthetic/latent sources' :class:`~hfs.data.plan.Regime`, checked against the views per class."""
    from hfs.data.plan import Regime

    regime = Regime(d.synthetic_duplicates, d.synthetic_label_noise, d.synthetic_min_views)
    regime.check(d.synthetic_images_per_class, lambda field: f"config key 'data.synthetic_{field}'")
    return regime


def _synthetic(cfg):
    from hfs.data.synthetic import SyntheticIdentities

    d = cfg.data
    common = dict(num_classes=d.synthetic_classes, images_per_class=d.synthetic_images_per_class,
                  image_size=d.image_size, seed=d.synthetic_seed, val_per_class=d.synthetic_val_per_class,
                  cluster_size=d.synthetic_cluster_size, regime=_regime(d))
    train = SyntheticIdentities(split="train", hflip=d.hflip, **common)
    val = SyntheticIdentities(split="val", **common) if d.synthetic_val_per_class > 0 else None
    return train, val, d.synthetic_classes


def _latent(cfg):
    """Synthetic identities as vectors (`hfs.data.latent`), sized by the synthetic_* keys."""
    from hfs.data.latent import LatentGenerator, LatentIdentities

    d = cfg.data
    gen = LatentGenerator(d.synthetic_seed, input_dim=d.image_size, cluster_size=d.synthetic_cluster_size)
    common = dict(val_per_class=d.synthetic_val_per_class, regime=_regime(d))
    train = LatentIdentities(gen, d.synthetic_classes, d.synthetic_images_per_class, split="train", **common)
    val = (LatentIdentities(gen, d.synthetic_classes, d.synthetic_images_per_class, split="val", **common)
           if d.synthetic_val_per_class > 0 else None)
    return train, val, d.synthetic_classes


def _root(cfg) -> Path:
    if not cfg.data.root:
        raise HfsError(f"data.root must be set for data.source={cfg.data.source}")
    root = Path(cfg.data.root)
    if not root.is_dir():
        raise HfsError(f"data.root {root} is not a folder")
    return root


def _num_classes(root: Path, labels: Sequence[np.ndarray], what: str) -> int:
    """The property file's class count when present (checked against the labels), else max + 1."""
    from hfs.data.recordio import read_property

    top = max((int(lab.max()) for lab in labels if len(lab)), default=-1)
    prop = root / "property"
    if prop.is_file():
        num_classes = read_property(prop)[0]
        if top >= num_classes:
            raise HfsError(f"{what} has label {top} but {prop} says {num_classes} classes")
        return num_classes
    return top + 1


def _from_lists(cfg):
    d, root = cfg.data, _root(cfg)
    train = ImageListDataset(root / d.train_list, root, d.image_size, True, d.hflip, cfg.train.seed, d.decoder)
    val = None
    if d.val_list:
        val = ImageListDataset(root / d.val_list, root, d.image_size, train=False, decoder=d.decoder)
        if len(val) == 0:
            val = None
    if len(train) == 0:
        raise HfsError(f"{root / d.train_list} lists no images")
    labels = [train.labels()] + ([val.labels()] if val is not None else [])
    return train, val, _num_classes(root, labels, str(root / d.train_list))


def _from_rec(cfg):
    from hfs.data.recordio import RecordFile, read_layout

    d, root = cfg.data, _root(cfg)
    rec_path, idx_path = root / f"{d.rec_name}.rec", root / f"{d.rec_name}.idx"
    if not idx_path.is_file():
        raise HfsError(f"index not found: {idx_path} (data.source=rec reads through the .idx)")
    rec = RecordFile(rec_path, idx_path)
    layout = read_layout(rec)
    if len(layout.image_keys) == 0:
        raise HfsError(f"{rec_path} holds no images")
    is_val = split_per_identity(layout.labels, d.rec_val_ratio, d.split_seed)
    train = RecDataset(rec, layout.image_keys[~is_val], layout.labels[~is_val], d.image_size, True, d.hflip,
                       cfg.train.seed, d.decoder)
    val = None
    if is_val.any():
        val = RecDataset(rec, layout.image_keys[is_val], layout.labels[is_val], d.image_size, train=False,
                         decoder=d.decoder)
    num_classes = layout.num_classes
    if (root / "property").is_file():
        num_classes = _num_classes(root, [layout.labels], str(rec_path))
    log.info("%s: %d images of %d classes (%s layout)", rec_path, len(layout.image_keys), num_classes,
             "InsightFace" if layout.is_insightface else "im2rec")
    return train, val, num_classes
