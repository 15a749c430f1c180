"""Learning-rate schedules as pure functions of the step.

Because the lr is a function of (config, step) only, a checkpoint needs no scheduler
object: resuming at step k gives exactly the lr an uninterrupted run had at step k. The
same value drives the backbone's SGD and, times ``fc.lr_scale``, the classifier rows in the
weight store.
"""

from __future__ import annotations

import math

from hfs.config import OptimConfig


def lr_at(step: int, optim: OptimConfig, total_steps: int) -> float:
    """The learning rate of optimizer step ``step`` (0-based) out of ``total_steps``."""
    base = optim.lr
    warm = optim.warmup_steps
    if warm and step < warm:
        return base * (step + 1) / warm
    if optim.schedule == "constant":
        return base
    if optim.schedule == "multistep":
        return base * optim.gamma ** sum(1 for m in optim.milestones if step >= m)
    span = max(total_steps - warm, 1)
    progress = min(max(step - warm, 0) / span, 1.0)
    if optim.schedule == "cosine":
        return base * 0.5 * (1.0 + math.cos(math.pi * progress))
    return base * (1.0 - progress) ** optim.power  # poly
