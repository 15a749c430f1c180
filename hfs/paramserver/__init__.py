"""The classifier's big matrix outside the trainer: in-process store, ZeroMQ server and client."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hfs.config import ParamServerConfig
    from hfs.paramserver.base import WeightStore

SECRET_ENV = "HFS_PS_SECRET"


def resolve_secret(configured: str = "", secret_file: str | Path | None = None) -> bytes | None:
    """The shared secret: --secret-file, else HFS_PS_SECRET, else the config; None when unset."""
    from hfs.utils.errors import HfsError

    if secret_file:
        try:
            text = Path(secret_file).read_text().strip()
        except OSError as exc:
            raise HfsError(f"cannot read secret file {secret_file}: {exc.strerror or exc}") from None
        if not text:
            raise HfsError(f"secret file {secret_file} is empty")
        return text.encode()
    text = os.environ.get(SECRET_ENV, "") or configured
    return text.encode() if text else None


def snapshot_dir_for(cfg: "ParamServerConfig", output_dir: str | Path) -> Path:
    """Where a run's store keeps snapshots: ``paramserver.snapshot_dir``, else ``<output_dir>/store``
    (the trainer's in-process store and the server `hfs train-dist` starts use the same folder)."""
    return Path(cfg.snapshot_dir or Path(output_dir) / "store")


def open_store(cfg: "ParamServerConfig", snapshot_dir: str | Path | None, resume_hint: str = "") -> "WeightStore":
    """The in-process store when ``cfg.address`` is empty, else a client of `hfs serve-params`.

    ``snapshot_dir`` is where the in-process store keeps snapshots (see
    :func:`snapshot_dir_for`); a server keeps its own. ``resume_hint``: the command that
    continues the run, which a client names when its server stops answering.
    """
    if not cfg.address:
        from hfs.paramserver.store import InProcessStore

        return InProcessStore(snapshot_dir, keep_snapshots=cfg.keep_snapshots,
                              timeout_s=cfg.timeout_s, snapshot_every_steps=cfg.snapshot_every_steps,
                              snapshot_every_s=cfg.snapshot_every_s, update_rule=cfg.update_rule,
                              kernel=cfg.kernel)
    from hfs.paramserver.client import ParamClient

    return ParamClient(cfg.address, timeout_s=cfg.timeout_s, connect_timeout_s=cfg.connect_timeout_s,
                       secret=resolve_secret(cfg.secret), shared_memory=cfg.shared_memory,
                       pipeline_pushes=cfg.pipeline_pushes, resume_hint=resume_hint)
