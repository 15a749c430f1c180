"""The run folder of `hfs train` / `hfs train-dist`: where a run writes, checked before it starts.

Kept apart from the training loop: these decide *where* a (resumed) run writes and whether
there is anything left to do, from the config and the checkpoint alone, before any model,
dataset or store is built.
"""

from __future__ import annotations

import logging
from pathlib import Path

from hfs.config import HfsConfig
from hfs.utils.writable import require_writable_dir

log = logging.getLogger(__name__)


def store_snapshot_dir(cfg: HfsConfig) -> tuple[Path, str]:
    """The in-process store's snapshot folder and the config key it comes from."""
    if cfg.paramserver.snapshot_dir:
        return Path(cfg.paramserver.snapshot_dir), "config key 'paramserver.snapshot_dir'"
    return Path(cfg.train.output_dir) / "store", "config key 'train.output_dir'"


def check_train_outputs(cfg: HfsConfig) -> None:
    """Every folder a training run writes into can be written, before the run starts."""
    require_writable_dir(cfg.train.output_dir, "config key 'train.output_dir'")
    if cfg.fc.mode == "sampled" and not cfg.paramserver.address:
        folder, name = store_snapshot_dir(cfg)
        require_writable_dir(folder, name)
    if cfg.sampler.workdir:
        require_writable_dir(cfg.sampler.workdir, "config key 'sampler.workdir'")
