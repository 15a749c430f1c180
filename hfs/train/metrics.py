"""Metrics sinks chosen by ``train.loggers``: JSON lines in the run folder, TensorBoard, Weights & Biases.

The trainer writes each record (a dict with ``step``) once to a :class:`MetricsWriter`, which
hands it to every configured sink. ``metrics.jsonl`` is the run's own record (the evidence
scripts read it); TensorBoard and wandb mirror its numeric scalars. TensorBoard is used when
installed (the ``tensorboard`` extra) and skipped with an info line otherwise; wandb, when
asked for, must be installed (the ``wandb`` extra) and runs offline unless told it may go
online (``train.wandb_mode``), so a run on a box without network or API key still logs.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Protocol

from hfs.utils.atomic import atomic_write_text

if TYPE_CHECKING:
    from hfs.config import HfsConfig

log = logging.getLogger(__name__)

WANDB_RUN_ID_FILE = "wandb_run_id"


class Sink(Protocol):
    def write(self, record: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


def _scalars(record: Mapping[str, Any]) -> dict[str, float]:
    """The record's numbers other than the step (what TensorBoard and wandb can plot)."""
    return {k: v for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


class JsonlSink:
    """Appends one JSON object per record to ``<output_dir>/metrics.jsonl``."""

    def __init__(self, output_dir: str | Path, resume_step: int | None = None) -> None:
        self.path = Path(output_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            self._truncate_after(resume_step)
        self._fh = self.path.open("a")

    def _truncate_after(self, step: int) -> None:
        """Drop records an interrupted run wrote past the checkpoint we resume from."""
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except json.JSONDecodeError:
                continue  # a line cut short by the interruption
        atomic_write_text(self.path, "".join(f"{k}\n" for k in kept))

    def write(self, record: dict[str, Any]) -> None:
        self._fh.write(json.dumps(record, sort_keys=True) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


class TensorBoardSink:
    """Scalars to ``<output_dir>/tensorboard`` through torch's SummaryWriter."""

    def __init__(self, writer) -> None:
        self._tb = writer

    @classmethod
    def open(cls, output_dir: str | Path) -> "TensorBoardSink | None":
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            log.info("train.loggers has tensorboard but it is not installed (pip install tensorboard); "
                     "skipping it")
            return None
        return cls(SummaryWriter(str(Path(output_dir) / "tensorboard")))

    def write(self, record: dict[str, Any]) -> None:
        step = record.get("step", 0)
        for key, value in _scalars(record).items():
            self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        self._tb.close()


def resolve_wandb_mode(configured: str, environ: Mapping[str, str]) -> str:
    """``train.wandb_mode``; auto = WANDB_MODE when set, online with WANDB_API_KEY, else offline."""
    if configured != "auto":
        return configured
    if environ.get("WANDB_MODE"):
        return environ["WANDB_MODE"]
    return "online" if environ.get("WANDB_API_KEY") else "offline"


class WandbSink:
    """One wandb run per training run; a resumed run continues it (the id is kept in the run folder)."""

    def __init__(self, run) -> None:
        self._run = run

    @classmethod
    def open(cls, cfg: "HfsConfig", resume: bool) -> "WandbSink":
        from hfs.utils.optional import install_hint, require

        wandb = require("wandb", "train.loggers=wandb", install_hint("wandb", "wandb"))
        out = Path(cfg.train.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        id_file = out / WANDB_RUN_ID_FILE
        run_id = id_file.read_text().strip() if resume and id_file.is_file() else ""
        if not run_id:
            run_id = uuid.uuid4().hex[:12]  # wandb ids: lowercase letters and digits
            atomic_write_text(id_file, run_id + "\n")
        mode = resolve_wandb_mode(cfg.train.wandb_mode, os.environ)
        run = wandb.init(project=cfg.train.wandb_project, name=out.name, id=run_id, resume="allow", mode=mode,
                         dir=str(out), config=cfg.to_dict())
        log.info("wandb run %s (%s) in %s", run_id, mode, out / "wandb")
        return cls(run)

    def write(self, record: dict[str, Any]) -> None:
        scalars = _scalars(record)
        if scalars:
            self._run.log(scalars, step=int(record.get("step", 0)))

    def close(self) -> None:
        self._run.finish()


class MetricsWriter:
    """Hands each record to every sink; closes them all."""

    def __init__(self, sinks: Iterable[Sink]) -> None:
        self.sinks = list(sinks)

    def write(self, record: dict[str, Any]) -> None:
        for sink in self.sinks:
            sink.write(record)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


def open_metrics(cfg: "HfsConfig", resume_step: int | None = None) -> MetricsWriter:
    """The sinks of ``train.loggers`` for ``train.output_dir`` (resuming: records past ``resume_step`` dropped)."""
    out = cfg.train.output_dir
    sinks: list[Sink] = []
    for name in dict.fromkeys(cfg.train.loggers):  # each once, in the given order
        if name == "jsonl":
            sinks.append(JsonlSink(out, resume_step))
        elif name == "tensorboard":
            tb = TensorBoardSink.open(out)
            if tb is not None:
                sinks.append(tb)
        elif name == "wandb":
            sinks.append(WandbSink.open(cfg, resume=resume_step is not None))
    return MetricsWriter(sinks)
