"""What every evidence script records next to its numbers: command, date, load, commit, machine.

The machine these benchmarks run on is shared and noisy, so each result file carries the
load average at the start and the end of the run, and the exact command that produced it.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterable


def script_parser(doc: str) -> argparse.ArgumentParser:
    """An evidence script's parser: the first paragraph of its docstring as the description, the
    example command in it kept as written."""
    return argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def console_logging() -> None:
    """INFO lines with the time and the logger's name: what every evidence script (and its worker processes) logs."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")


def start_run(args: argparse.Namespace) -> dict[str, Any]:
    """Console logging on, and the context its results file records: :func:`run_context` with the script's arguments."""
    console_logging()
    return {**run_context(), "args": vars(args)}


def record_each(path: str | Path, context: dict[str, Any], rows: Iterable[Any]) -> list[Any]:
    """Collect ``rows`` as they are measured, rewriting the results file after each: a run cut short
    keeps every row it finished."""
    done: list[Any] = []
    for row in rows:
        done.append(row)
        write_results(path, context, done)
    return done


def run_context() -> dict[str, Any]:
    """Date (UTC), load average, git commit, CPU count and the command line of this run."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                check=False).stdout.strip()
    except OSError:
        commit = ""
    return {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
        "loadavg_start": list(os.getloadavg()),
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "git_commit": commit,
        "command": "PYTHONPATH=. python " + " ".join(shlex.quote(a) for a in sys.argv),
    }


def write_results(path: str | Path, context: dict[str, Any], results: Any) -> Path:
    """Write ``{"context": ..., "results": ...}`` atomically (with the end-of-run load added)."""
    from hfs.utils.atomic import atomic_write_text

    context = dict(context, loadavg_end=list(os.getloadavg()),
                   date_end_utc=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps({"context": context, "results": results}, indent=1) + "\n")
    return path
