"""Plain progress lines for logs: what training shows when stdout is not a terminal.

Under nohup, sbatch or ``| tee`` a rich bar is drawn once at the very end (cut at 80
columns), so a log file says nothing while the run is going. Then every log step gets one
self-contained line instead: step, loss, accuracy, throughput, index upkeep, lr and ETA.
"""

from __future__ import annotations

import sys
import time
from typing import IO, Any


def format_eta(seconds: float) -> str:
    seconds = max(int(round(seconds)), 0)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class PlainLog:
    """Writes one line per logged record to ``stream`` (stdout) when it is not a terminal."""

    def __init__(self, total: int, start: int, stream: IO[str] | None = None) -> None:
        self.stream = stream if stream is not None else sys.stdout
        self.enabled = not _is_terminal(self.stream)
        self.total, self.start = total, start
        self.t0 = time.perf_counter()

    def line(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        step = int(record["step"])
        per_step = (time.perf_counter() - self.t0) / max(step - self.start, 1)
        text = (f"step {step}/{self.total} loss {record['loss']:.4f} acc {record['acc']:.1%} "
                f"{record['samples_per_s']:.0f} img/s upkeep {record['upkeep_share']:.0%} lr {record['lr']:.3g} "
                f"ETA {format_eta(per_step * (self.total - step))}")
        self.stream.write(text + "\n")
        self.stream.flush()


def _is_terminal(stream: IO[str]) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False
