"""The one interface the trainer holds: :class:`ClassifierLayer`, built by :func:`build_classifier`.

``fc.mode`` names a factory in :data:`CLASSIFIERS`; the factory builds the layer and
restores what a checkpoint keeps of it (rows in the checkpoint or in a weight store), so
the trainer never asks which layer it holds. A new mode is a class implementing the
protocol plus one registered factory (see :mod:`hfs.fc.factories`).
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from hfs.dist import DistEnv
from hfs.fc.common import FCOutput
from hfs.registry import Registry
from hfs.utils.errors import HfsError


@runtime_checkable
class ClassifierLayer(Protocol):
    """What the trainer calls, in step order: before_step -> __call__ (per micro-batch) ->
    backward -> after_backward -> optimizer step -> end_step."""

    num_classes: int
    active_classes: int  # classes scored per step (all of them, or the sampled/sharded share)

    def __call__(self, features: torch.Tensor, labels: torch.Tensor, step: int, *,
                 last_micro: bool = True, grad_scale: float = 1.0) -> FCOutput: ...

    def param_groups(self) -> list[dict[str, Any]]:
        """Optimizer groups of the rows the trainer's optimizer trains (``lr_scale`` each); [] when a store does."""

    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Called once the optimizer exists (e.g. to make its update of the rows row-sparse)."""

    def grad_scale(self, amp_scale: float) -> float:
        """The ``grad_scale`` to pass to ``__call__`` for the AMP scaler's ``amp_scale``."""

    def before_step(self, lr: float, momentum: float, weight_decay: float) -> None:
        """The schedule's values for the coming step (a store applies them itself)."""

    def after_backward(self) -> None:
        """After the last micro-batch's backward, before the optimizer step."""

    def end_step(self, step: int) -> None:
        """After the optimizer step of ``step``."""

    def checkpoint_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """The checkpoint entries ``fc``, ``optimizer`` and ``store_snapshot``, world-size
        independent; every rank calls (the values matter on rank 0)."""

    def optimizer_state(self, saved: dict[str, Any]) -> dict[str, Any]:
        """A checkpoint's ``optimizer`` entry as this rank's optimizer loads it."""

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        """Top-1 class over all classes (every rank calls, with the same number of rows)."""

    def upkeep(self) -> dict[str, float]:
        """The class selector's own account for the log line (empty without one)."""

    def sampler_seconds(self) -> float:
        """Seconds spent choosing classes so far (the log's 'upkeep' share)."""

    def close(self) -> None:
        """Stop background work (pushes, index builds). Idempotent."""


@dataclass
class ClassifierContext:
    """What a classifier factory needs besides the config, worked out once by the trainer."""

    num_classes: int
    head: torch.nn.Module
    device: torch.device
    env: DistEnv
    stack: ExitStack  # closes what the factory opens (a store client, a selector's builds)
    checkpoint: dict[str, Any] | None = None  # the run being resumed: the factory restores its rows
    checkpoint_path: Path | None = None
    resume_hint: str = ""  # the command that continues this run, named by a store whose server is lost


CLASSIFIERS: Registry[ClassifierLayer] = Registry("classifier (fc.mode)")


def build_classifier(cfg: Any, ctx: ClassifierContext) -> ClassifierLayer:
    """The classifier layer ``cfg.fc.mode`` names, built (and restored) for ``ctx``."""
    import hfs.fc.factories  # noqa: F401  (registers full, sampled and sharded)

    return CLASSIFIERS.build(cfg.fc.mode, cfg, ctx)


def check_mode_runs_here(mode: str, launched: bool) -> None:
    """Refuse, before anything is built, a mode whose factory is ``launcher_only`` outside `hfs train-dist`."""
    import hfs.fc.factories  # noqa: F401

    def launcher_only(name: str) -> bool:
        return bool(getattr(CLASSIFIERS.get(name), "launcher_only", False))

    if launcher_only(mode) and not launched:
        here = " or ".join(n for n in CLASSIFIERS.names() if not launcher_only(n))
        raise HfsError(f"config key 'fc.mode' is '{mode}': that classifier is split across the ranks of "
                       f"`hfs train-dist`; `hfs train` takes {here}")


def needs_shared_store(mode: str) -> bool:
    """Whether the ranks of ``fc.mode`` share one weight store (`hfs train-dist` starts one when
    ``paramserver.address`` is empty); a factory says so with a ``shared_store = True`` attribute."""
    import hfs.fc.factories  # noqa: F401

    return bool(getattr(CLASSIFIERS.get(mode), "shared_store", False))


def selector_upkeep(selector: Any) -> dict[str, float]:
    """A selector's background build share, rebuilds so far and drift, as the log line names them."""
    upkeep = getattr(selector, "upkeep", None)
    return {} if upkeep is None else index_upkeep(upkeep())


def index_upkeep(u: dict) -> dict[str, float]:
    """An index's upkeep (``OwnedIndex.upkeep``, or a store's ``index_stats``) as the log line names it."""
    if not u:
        return {}
    return {"index_bg_share": float(u.get("bg_share", 0.0)), "index_rebuilds": int(u.get("builds", u.get("rebuilds", 0))),
            "index_drift": float(u.get("drift", 0.0))}
