"""The store's snapshots: what goes into one, when a periodic one is due, and loading one back.

A snapshot holds every matrix of this shard caught up to the last applied step (weights,
momentum, hparams, last applied step, update rule) and the next step to run; the folder
format, its atomic write and its checks are :mod:`hfs.paramserver.snapshots`. Periodic
snapshots are taken every ``every_steps`` steps and/or every ``every_s`` seconds while
something changed since the last one; the newest ``keep`` automatic ones are kept.

The snapshotter takes no lock: the store calls it under its own.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable

import numpy as np

from hfs.paramserver import snapshots as snaps
from hfs.paramserver.base import HParams, StoreError
from hfs.paramserver.kernels import RowKernel
from hfs.paramserver.matrix import Matrix, check_rule
from hfs.paramserver.sharding import ShardSpec
from hfs.utils.errors import HfsError

log = logging.getLogger(__name__)


class Snapshotter:
    """Snapshots of one store in ``folder`` (None: the store takes none)."""

    def __init__(self, folder: str | Path | None, *, keep: int = 3, every_steps: int = 0,
                 every_s: float = 0.0) -> None:
        self.folder = Path(folder) if folder else None
        self.keep = keep
        self.every_steps = every_steps
        self.every_s = every_s
        self._last_step = 0
        self._last_time = time.monotonic()
        self.dirty = False  # something changed since the last snapshot
        if self.folder is not None:
            for name in snaps.remove_stale_temps(self.folder):
                log.info("removed half-written snapshot folder %s", name)

    def require_folder(self) -> Path:
        if self.folder is None:
            raise StoreError("this store has no snapshot folder (set paramserver.snapshot_dir or --snapshot-dir)")
        return self.folder

    def _taken(self, step: int) -> None:
        self._last_step, self._last_time = step, time.monotonic()
        self.dirty = False

    # -- writing -------------------------------------------------------------------------
    def write(self, matrices: dict[str, Matrix], step: int, shard: ShardSpec, tag: str | None) -> tuple[str, float]:
        """Snapshot ``matrices`` (every row caught up first) as ``tag`` or ``step-<step>``; (name, seconds)."""
        folder = self.require_folder()
        name = snaps.check_plain_name(tag) if tag else snaps.auto_name(step)
        for m in matrices.values():
            m.catch_up_all()  # a snapshot holds every row as dense SGD has it now
        meta = {"step": step, "shard": {"index": shard.index, "count": shard.count},
                "matrices": {m.name: m.info() for m in matrices.values()}}
        arrays = {}
        for m in matrices.values():
            arrays[f"{m.name}.weight"] = m.weight
            arrays[f"{m.name}.momentum"] = m.momentum
        started = time.monotonic()
        snaps.write_snapshot(folder, name, meta, arrays)
        self._taken(step)
        return name, time.monotonic() - started

    def prune(self, name: str, step: int, seconds: float) -> None:
        """Remove the automatic snapshots beyond the newest ``keep`` (no lock needed) and log the write."""
        removed = snaps.prune_snapshots(self.require_folder(), self.keep)
        log.info("snapshot %s (step %d) written in %.2f s%s", name, step, seconds,
                 f"; removed {', '.join(removed)}" if removed else "")

    @property
    def periodic(self) -> bool:
        """Whether periodic snapshots are on (a folder, and a spacing in steps or seconds)."""
        return self.folder is not None and bool(self.every_steps or self.every_s)

    def take_if_due(self, step: int, take: Callable[[], object]) -> None:
        """Call ``take`` (the store's snapshot) when a periodic snapshot is due at ``step``. A failure is
        logged, not raised: the step that triggered it is applied, and a failed periodic snapshot
        must not fail that push or kill the server; the next try is at the next due point."""
        if self.folder is None or not self.dirty:
            return
        due_steps = self.every_steps and step - self._last_step >= self.every_steps
        due_time = self.every_s and time.monotonic() - self._last_time >= self.every_s
        if not (due_steps or due_time):
            return
        try:
            take()
        except (HfsError, OSError) as exc:
            log.error("periodic snapshot failed: %s", exc)
            self._last_step, self._last_time = step, time.monotonic()

    # -- reading -------------------------------------------------------------------------
    def load(self, tag: str, shard: ShardSpec, kernel: RowKernel) -> tuple[Path, int, dict[str, Matrix]]:
        """(folder, step, matrices) of snapshot ``tag`` of this shard, every file checked; nothing is replaced."""
        folder = snaps.resolve_snapshot(self.require_folder(), tag)
        manifest = snaps.read_manifest(folder)
        try:
            owner = manifest["shard"]
            if (owner["index"], owner["count"]) != (shard.index, shard.count):
                raise StoreError(f"snapshot {folder} belongs to shard {owner['index']} of {owner['count']}, "
                                 f"this store is shard {shard.index} of {shard.count}")
            step = int(manifest["step"])
            loaded = _load_matrices(folder, manifest, kernel)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise snaps.SnapshotError(f"snapshot manifest {folder / snaps.MANIFEST} is malformed "
                                      f"({exc.__class__.__name__}: {exc})") from None
        return folder, step, loaded

    def restored(self, step: int) -> None:
        """The store now holds snapshot ``step``: nothing to snapshot until it changes."""
        self._taken(step)


def _load_matrices(folder: Path, manifest: dict, kernel: RowKernel) -> dict[str, Matrix]:
    files = manifest["files"]
    loaded: dict[str, Matrix] = {}
    for name, info in manifest["matrices"].items():
        weight = snaps.load_array(folder, files[f"{name}.weight"])
        momentum = snaps.load_array(folder, files[f"{name}.momentum"])
        if weight.shape != momentum.shape or weight.dtype != np.float32 or weight.ndim != 2:
            raise StoreError(f"snapshot {folder}: matrix {name!r} has inconsistent arrays")
        hp = info.get("hparams")
        # snapshots before update rules existed were written by the lazy rule
        rule = check_rule(info.get("update_rule", "lazy"))
        loaded[name] = Matrix(name, int(info["rows"]), int(info["row_start"]), weight, momentum,
                              HParams(**hp) if hp else None, int(info.get("last_applied", -1)), rule,
                              kernel=kernel)
    return loaded
