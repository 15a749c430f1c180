"""A trained backbone from a checkpoint: what evaluation, extraction and export start from."""

from __future__ import annotations

from pathlib import Path

import torch

from hfs.checkpoint import load_checkpoint, resolve_checkpoint
from hfs.config import HfsConfig, config_from_dict
from hfs.models.backbones import build_backbone
from hfs.utils.errors import HfsError


def load_backbone(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[torch.nn.Module, HfsConfig]:
    """The trained backbone (eval mode) and the run's config, from a checkpoint or a run folder."""
    path = Path(path)
    if path.is_dir():
        path = resolve_checkpoint(str(path), path)
    ckpt = load_checkpoint(path, map_location)
    cfg = config_from_dict(ckpt["config"])
    try:
        model = build_backbone(cfg.model, cfg.data.image_size)
    except HfsError as exc:  # an arch this version does not know: say which file asked for it
        raise HfsError(f"checkpoint {path}: {exc}") from None
    model.load_state_dict(ckpt["backbone"])
    return model.to(map_location).eval(), cfg
