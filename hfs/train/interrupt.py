"""Two-stage stop for the training loop: the first Ctrl-C (or SIGTERM) finishes the step in
progress and writes a checkpoint; the second stops at once, without one.

Both stages say what happens at the moment they happen: a run that looks frozen after
Ctrl-C gets a second one, and a user who pressed it twice must know which steps survived.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

log = logging.getLogger(__name__)


def _again(signum: int) -> str:
    return "Ctrl-C again" if signum == signal.SIGINT else f"send {signal.Signals(signum).name} again"


def kept_after_hard_stop(output_dir: str | Path, command: str) -> str:
    """What a stop without a checkpoint leaves: the newest checkpoint on disk, or nothing."""
    from hfs.checkpoint import list_checkpoints

    found = list_checkpoints(output_dir)
    if not found:
        return "no checkpoint of this run exists yet, so its steps are lost"
    last = found[-1]
    step = int(last.stem.split("-")[1])
    return (f"kept {last} (step {step}); later steps are lost; "
            f"continue with `{command} --resume {Path(output_dir)}`")


@contextmanager
def two_stage_stop(request_stop: Callable[[str], None], stopping: Callable[[], bool],
                   step_in_progress: Callable[[], int], output_dir: str | Path, *, command: str = "hfs train",
                   announce: bool = True, hard_stop: bool = True) -> Iterator[None]:
    """Install the SIGINT/SIGTERM handlers for the duration of the block (main thread only).

    ``hard_stop=False`` (train-dist workers) ignores a second signal: the launcher forwards
    Ctrl-C too, and its shutdown timeout is the hard stop. ``announce`` is False on ranks
    other than 0, which stop as quietly as they run.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    owner = os.getpid()

    def handler(signum, _frame):
        if os.getpid() != owner:
            # a forked DataLoader worker (Ctrl-C reaches the whole process group): it keeps
            # serving batches until the trainer, which owns the stop, shuts it down
            return
        name = signal.Signals(signum).name
        if stopping():
            if not hard_stop:
                return
            log.warning("%s again: stopped now without a checkpoint; %s", name,
                        kept_after_hard_stop(output_dir, command))
            raise KeyboardInterrupt
        request_stop(name)
        if announce:
            log.warning("%s: stopping after step %d (%s to stop now without a checkpoint)", name,
                        step_in_progress(), _again(signum))

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def leave_stop_to_the_trainer(_worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: a signal sent to the whole process group (Ctrl-C in a
    terminal, ``scancel``, ``timeout``) must not kill the loader workers under the trainer,
    which is finishing its step and writing a checkpoint; the trainer shuts them down."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
