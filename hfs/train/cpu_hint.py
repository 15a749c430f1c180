"""A warning for runs that would take hours on a CPU (e.g. `hfs train` with the defaults:
iresnet50 over full softmax, ~1.5 min per step).

Said before the first step, from a timed forward pass (see `estimate_step_seconds`), and,
when that estimate was short but the first real step is slow, once more after it.
"""

from __future__ import annotations

import logging
import time

import torch
from torch import nn

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


#: backbones already as small as the quick config's: suggesting it to their users would help nobody
SMALL_ARCHES = ("tiny", "mlp")


def slow_cpu_message(device: torch.device, step_seconds: float, steps_left: int, how: str = "first step", *,
                     arch: str = "") -> str | None:
    """The warning for ``steps_left`` steps of ``step_seconds`` on ``device``, or None; the advice fits
    what was run: a large backbone hears of the quick config, a small one of what else makes a run long."""
    total = step_seconds * steps_left
    if device.type != "cpu" or total < SLOW_RUN_S:
        return None
    said = f"training on CPU at {step_seconds:.3g} s/step ({how}): about {format_duration(total)} for {steps_left} steps"
    if arch in SMALL_ARCHES:
        return (f"{said}; the backbone ({arch}) is already a small one: fewer steps (train.max_steps), a smaller "
                "train.batch_size or fewer classes (fc.sample_num with fc.mode=sampled) shorten the run, a GPU "
                "(train.device) runs it as it is")
    return (f"{said}; for a quick CPU run use `hfs train --config {QUICK_CONFIG}` "
            "(tiny backbone, HF-softmax, minutes)")


@torch.no_grad()
def estimate_step_seconds(backbone: nn.Module, image_size: int, images_per_step: int) -> float:
    """Seconds per step from a timed forward pass of up to 8 images after a warm-up one (eval
    mode, no state changed, the global RNG untouched). A training step costs about two such
    forwards per image (forward + backward, less the batching gain): within ~2x of the real
    step on the models tried (iresnet50, tiny), enough to tell minutes from hours."""
    was_training = backbone.training
    backbone.eval()
    try:
        count = max(1, min(images_per_step, 8))
        gen = torch.Generator().manual_seed(0)
        device = next(backbone.parameters()).device
        images = torch.rand(max(count, 2), 3, image_size, image_size, generator=gen).to(device)
        backbone(images[:2])  # the first call pays one-time allocation costs
        t0 = time.perf_counter()
        backbone(images[:count])
        per_image = (time.perf_counter() - t0) / count
    finally:
        backbone.train(was_training)
    return 2 * per_image * images_per_step


class CpuHintHook:
    """The training loop's hook (rank 0): :class:`CpuHint` before and after the first step."""

    def on_start(self, trainer) -> None:
        self.start = trainer.step
        self.hint = (CpuHint(trainer.device, trainer.total_steps - trainer.step, trainer.cfg.model.arch)
                     if trainer.env.is_main else None)
        if self.hint is not None:  # the defaults on a CPU take hours: say so before they start
            t = trainer.cfg.train
            self.hint.before_first_step(trainer.backbone, trainer.cfg.data.image_size, t.batch_size * t.grad_accum)

    def on_step_end(self, trainer, stats) -> dict:
        if self.hint is not None and trainer.step == self.start + 1:
            self.hint.after_first_step()
        return {}

    def on_end(self, trainer) -> dict:
        return {}

    def on_record(self, trainer, record, final: bool) -> None:
        pass


class CpuHint:
    """Warns once per run: before the first step from the estimate, else after it if it was slow."""

    def __init__(self, device: torch.device, steps_left: int, arch: str = "") -> None:
        self.device, self.steps_left, self.arch, self.said = device, steps_left, arch, False
        self.t0 = time.perf_counter()

    def before_first_step(self, backbone: nn.Module, image_size: int, images_per_step: int) -> None:
        if self.device.type == "cpu" and self.steps_left > 0:
            try:
                seconds = estimate_step_seconds(backbone, image_size, images_per_step)
            except (RuntimeError, ValueError) as exc:  # a backbone whose input is not an image (e.g. mlp)
                log.debug("no CPU time estimate before the first step: %s", exc)
            else:
                self._say(slow_cpu_message(self.device, seconds, self.steps_left, "estimated from a forward pass",
                                           arch=self.arch))
        self.t0 = time.perf_counter()

    def after_first_step(self) -> None:
        if not self.said:
            self._say(slow_cpu_message(self.device, time.perf_counter() - self.t0, self.steps_left, arch=self.arch))

    def _say(self, message: str | None) -> None:
        if message:
            log.warning(message)
            self.said = True
