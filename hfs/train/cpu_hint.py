"""A warning for runs that would take hours on a CPU (e.g. `hfs train` with the defaults:
iresnet50 over full softmax, ~1.5 min per step), measured on the first step."""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

SLOW_RUN_S = 600.0  # a CPU run estimated longer than this gets the warning
QUICK_CONFIG = "configs/quickstart_cpu.yaml"


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


def slow_cpu_message(device: torch.device, step_seconds: float, steps_left: int) -> str | None:
    """The warning for ``steps_left`` steps of ``step_seconds`` on ``device``, or None."""
    total = step_seconds * steps_left
    if device.type != "cpu" or total < SLOW_RUN_S:
        return None
    return (f"training on CPU at {step_seconds:.3g} s/step (first step): about {format_duration(total)} "
            f"for {steps_left} steps; for a quick CPU run use `hfs train --config {QUICK_CONFIG}` "
            "(tiny backbone, HF-softmax, minutes)")


def warn_if_slow_on_cpu(device: torch.device, step_seconds: float, steps_left: int) -> None:
    message = slow_cpu_message(device, step_seconds, steps_left)
    if message:
        log.warning(message)
