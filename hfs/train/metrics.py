"""Metrics sinks: JSON lines in the run folder, and TensorBoard when it is installed."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from hfs.utils.atomic import atomic_write_text

log = logging.getLogger(__name__)


class MetricsWriter:
    """Appends one JSON object per record to ``metrics.jsonl``; mirrors scalars to TensorBoard."""

    def __init__(self, output_dir: str | Path, resume_step: int | None = None) -> None:
        self.path = Path(output_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            self._truncate_after(resume_step)
        self._fh = self.path.open("a")
        self._tb = self._open_tensorboard(Path(output_dir) / "tensorboard")

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

    @staticmethod
    def _open_tensorboard(folder: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            return None
        return SummaryWriter(str(folder))

    def write(self, record: dict[str, Any]) -> None:
        self._fh.write(json.dumps(record, sort_keys=True) + "\n")
        self._fh.flush()
        if self._tb is not None:
            step = record.get("step", 0)
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        self._fh.close()
        if self._tb is not None:
            self._tb.close()
