"""Logging and the user-facing rich console; configured by the CLI, never at import."""

from __future__ import annotations

import logging


def make_console(stderr: bool = False):
    """A rich Console (imported lazily so `hfs --help` stays fast)."""
    from rich.console import Console

    return Console(stderr=stderr)


def setup_logging(verbose: int = 0) -> None:
    """Route `logging` through rich on stderr: INFO by default, DEBUG with -v.

    When stderr is not a terminal (nohup, sbatch, a pipe) every record is one plain line with
    its date and level, never wrapped at 80 columns, so log files can be grepped.
    """
    import sys

    from rich.logging import RichHandler

    level = logging.DEBUG if verbose > 0 else logging.INFO
    if sys.stderr.isatty():
        handler: logging.Handler = RichHandler(console=make_console(stderr=True), show_path=False,
                                               rich_tracebacks=False)
        fmt, datefmt = "%(message)s", "[%X]"
    else:
        handler = logging.StreamHandler(sys.stderr)
        fmt, datefmt = "%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"
    logging.basicConfig(level=level, format=fmt, datefmt=datefmt, handlers=[handler], force=True)


def progress(console=None, transient: bool = False):
    """The one progress-bar style used by every long-running command."""
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)

    console = console or make_console(stderr=True)
    # Off a terminal rich would draw one frame at the very end, cut at 80 columns: no bar
    # at all is clearer (training prints plain lines instead, see hfs.train.plain_log).
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                    console=console, transient=transient, disable=not console.is_terminal)


def prefix_log_lines(prefix: str) -> None:
    """Start every log line of this process with ``prefix`` (e.g. which shard of a group wrote it)."""

    class _Prefix(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            if not getattr(record, "_hfs_prefixed", False):
                record.msg, record._hfs_prefixed = f"{prefix}{record.msg}", True
            return True

    for handler in logging.getLogger().handlers:
        handler.addFilter(_Prefix())
