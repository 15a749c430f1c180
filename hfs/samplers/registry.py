"""The sampler registry: name -> ClassSampler subclass (kept apart from ``__init__`` to avoid import cycles)."""

from __future__ import annotations

from hfs.registry import Registry
from hfs.samplers.base import ClassSampler

SAMPLERS: Registry[ClassSampler] = Registry("sampler")
