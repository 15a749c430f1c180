"""The synchronous step: which workers a step waits for, the pushes it holds, and its deadline.

With no registered worker a push is applied at once (the single-process trainer). With
workers registered, a step's *expected* set is the registered set at its first push; its
pushes are held until every expected worker pushed, then handed out in step order to be
summed and applied. A step whose workers did not all arrive within ``timeout_s`` of its
first push *fails*: its gradients are discarded, every waiter and late pusher gets an error
naming the missing workers, and those workers are unregistered (so a restarted job is not
held up by a dead one). A step of a matrix is ready to read at ``t`` when no step before
``t`` is held.

The barrier keeps no rows of its own and takes no lock: the store calls it under its lock.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from hfs.paramserver.base import StoreError

log = logging.getLogger(__name__)

#: Failed steps remembered per matrix, for late pushers.
FAILED_KEEP = 64


@dataclass
class PendingStep:
    """Gradients of one step while some registered workers have not pushed yet."""

    step: int
    deadline: float
    expected: set[str]
    pushed: set[str] = field(default_factory=set)
    rows: list[np.ndarray] = field(default_factory=list)
    grads: list[np.ndarray] = field(default_factory=list)

    def complete(self) -> bool:
        return self.expected <= self.pushed


class StepBarrier:
    """The registered workers and, per matrix, the steps they have not all pushed yet."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._workers: set[str] = set()
        self._pending: dict[str, dict[int, PendingStep]] = defaultdict(dict)
        self._failed: dict[str, dict[int, str]] = defaultdict(dict)

    # -- workers -------------------------------------------------------------------------
    @property
    def workers(self) -> list[str]:
        return sorted(self._workers)

    def register(self, worker: str) -> None:
        self._workers.add(str(worker))

    def leave(self, worker: str) -> None:
        """Unregister ``worker``; the steps it was expected in stop waiting for it."""
        self._workers.discard(worker)
        for pending in self._pending.values():
            for p in pending.values():
                p.expected.discard(worker)

    def resolve(self, worker: str | None) -> str | None:
        """The pusher's name: ``worker``, or the only registered one when it is left out."""
        if worker is None:
            if len(self._workers) > 1:
                raise StoreError(f"push without a worker name while {len(self._workers)} workers are registered")
            return next(iter(self._workers), None)
        if self._workers and worker not in self._workers:
            raise StoreError(f"worker {worker!r} is not registered (registered: {', '.join(sorted(self._workers))})")
        return worker

    # -- pushes --------------------------------------------------------------------------
    def check_push(self, name: str, step: int, last_applied: int) -> None:
        """A StoreError when ``step`` of matrix ``name`` failed or is already applied."""
        failed = self._failed[name]
        if step in failed:
            raise StoreError(failed[step])
        if step <= last_applied:
            raise StoreError(f"step {step} of matrix {name!r} is already applied (last applied: {last_applied})")

    def applies_at_once(self, name: str, step: int) -> bool:
        """True when a push of ``step`` needs no waiting: no worker is registered and none is held for it."""
        return not self._workers and step not in self._pending[name]

    def hold(self, name: str, step: int, worker: str | None, rows: np.ndarray, grads: np.ndarray) -> None:
        """Keep ``worker``'s push of ``step`` until every expected worker pushed (the caller owns the arrays
        from now on); the step's expected set and deadline are fixed at its first push."""
        pending = self._pending[name].get(step)
        if pending is None:
            pending = self._pending[name][step] = PendingStep(step, time.monotonic() + self.timeout_s,
                                                              set(self._workers))
        if worker in pending.pushed:
            raise StoreError(f"worker {worker!r} already pushed step {step} of matrix {name!r}")
        pending.pushed.add(worker)
        pending.rows.append(rows)
        pending.grads.append(grads)

    def pop_complete(self, name: str) -> list[PendingStep]:
        """The held steps of ``name`` that every expected worker pushed, in step order, up to the
        first that is still waiting (they leave the barrier: the caller applies them)."""
        pending, due = self._pending[name], []
        while pending:
            first = min(pending)
            if not pending[first].complete():
                break
            due.append(pending.pop(first))
        return due

    # -- reads ---------------------------------------------------------------------------
    def ready(self, name: str, step: int, last_applied: int) -> bool:
        """True when no step of ``name`` before ``step`` is held; raises if one of them failed."""
        for failed_step, message in self._failed[name].items():
            if last_applied < failed_step < step:
                raise StoreError(message)
        return not any(s < step for s in self._pending[name])

    # -- deadlines -----------------------------------------------------------------------
    def next_deadline(self) -> float | None:
        return min((p.deadline for pending in self._pending.values() for p in pending.values()), default=None)

    def expire(self, now: float) -> list[str]:
        """Fail the held steps whose deadline passed (their missing workers unregistered); their messages."""
        messages = []
        for name, pending in self._pending.items():
            for step in sorted(s for s, p in pending.items() if p.deadline <= now):
                messages.append(self._fail(name, pending.pop(step)))
        return messages

    def _fail(self, name: str, pending: PendingStep) -> str:
        missing = sorted(pending.expected - pending.pushed)
        message = (f"step {pending.step} of matrix {name!r} failed: worker(s) {', '.join(missing)} did not "
                   f"push within {self.timeout_s:g} s (pushed: {', '.join(sorted(pending.pushed)) or 'none'}); "
                   "its gradients were discarded and the missing workers unregistered")
        failed = self._failed[name]
        failed[pending.step] = message
        while len(failed) > FAILED_KEEP:
            del failed[min(failed)]
        self._workers.difference_update(missing)
        log.error(message)
        return message

    def held_steps(self) -> int:
        """How many steps wait for pushes, over all matrices."""
        return sum(len(pending) for pending in self._pending.values())

    def forget_steps(self) -> None:
        """Drop every held and failed step (a restore replaced the matrices); the workers stay."""
        self._pending.clear()
        self._failed.clear()
