"""Building a run: the checks and derived sizes the trainer works out once, and its optimizer.

Kept apart from the loop (`hfs.train.trainer`) so each piece is small and replaceable:
The optimizer is built by :func:`hfs.train.optim.build_optimizer`.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hfs import checkpoint as ckpt_io
from hfs.config import HfsConfig
from hfs.train.data_order import DataPosition
from hfs.utils.errors import HfsError

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_num_classes(configured: int, in_data: int) -> int:
    """fc.num_classes, or the data's class count when 0; too few classes is an error."""
    if configured == 0:
        return in_data
    if configured < in_data:
        raise HfsError(f"config key 'fc.num_classes' is {configured} but the training data has "
                       f"{in_data} classes (labels 0..{in_data - 1}); set it to >= {in_data} or 0")
    return configured


def build_datasets_for(cfg: HfsConfig):
    """(train, val or None, num_classes) from `hfs.data.datasets` (which checks data.root)."""
    from hfs.data.datasets import build_datasets

    return build_datasets(cfg)


def check_batch_fits(num_images: int, batch_size: int, world: int) -> None:
    if num_images < batch_size * world:
        raise HfsError(f"the training set has {num_images} images, fewer than "
                       f"train.batch_size={batch_size}" + (f" x {world} ranks" if world > 1 else ""))


def check_resume(ckpt: dict | None, path: Path | None, cfg: HfsConfig, num_classes: int) -> None:
    """A fresh run needs an empty output_dir; a resumed one the checkpoint's mode and classes."""
    if ckpt is None:
        if ckpt_io.list_checkpoints(cfg.train.output_dir):
            raise HfsError(f"train.output_dir {cfg.train.output_dir} already holds checkpoints of another run; "
                           "continue it with --resume latest or choose another train.output_dir")
        return
    if ckpt.get("fc_mode") != cfg.fc.mode:
        raise HfsError(f"checkpoint {path} is a fc.mode={ckpt.get('fc_mode')} run, "
                       f"this config says fc.mode={cfg.fc.mode}")
    if ckpt.get("num_classes") != num_classes:
        raise HfsError(f"checkpoint {path} was trained with {ckpt.get('num_classes')} "
                       f"classes, this config has {num_classes}")


def total_steps(tcfg: Any, num_images: int, world: int) -> int:
    """train.max_steps, else epochs x the optimizer steps of one epoch (at least 1)."""
    batches_per_epoch = num_images // (tcfg.batch_size * world)
    return tcfg.max_steps or max(tcfg.epochs * batches_per_epoch // tcfg.grad_accum, 1)


def rescale_position(pos: DataPosition, ckpt: dict, new_global_batch: int) -> DataPosition:
    """Keep the data position when the global batch changed (another world size):
    continue after the same number of images of the same epoch's permutation."""
    old = int(ckpt.get("world_size", 1)) * int(ckpt["config"]["train"]["batch_size"])
    if old == new_global_batch:
        return pos
    log.info("global batch %d -> %d: data position rescaled", old, new_global_batch)
    return DataPosition(pos.epoch, pos.batch * old // new_global_batch)
