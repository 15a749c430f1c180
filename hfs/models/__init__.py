"""Backbones and margin heads behind registries."""

from hfs.models.backbones import BACKBONES, build_backbone
from hfs.models.heads import HEADS, build_head

__all__ = ["BACKBONES", "HEADS", "build_backbone", "build_head"]
