"""SampledFC: HF-softmax over the active classes, with the full matrix in a weight store.

Per optimizer step: the selector picks the active classes (positives, nearest negatives,
random fill), their rows are fetched from the store, the head runs on them, and a gradient
hook on the fetched rows sends the rows' gradients back to the store, which applies the
SGD update. The trainer process holds only ``sample_num`` rows at a time.

Gradient accumulation: every micro-batch of a cycle fetches its rows at the same store step
(no update lands inside a cycle, as for the backbone), and the row gradients of all
micro-batches are concatenated into ONE push when the last micro-batch's backward runs;
rows active in several micro-batches add up in the store, exactly as their gradients would
in one big batch. The push runs on a background thread so it overlaps the backbone's
backward pass, its optimizer step, the next batch's loading and the next backbone forward.
It is waited for before the next selection, a snapshot or a validation pass, and the
selector's refresh for a step runs only after its push has landed (at the start of the next
forward), so results do not depend on thread timing.

The selector observes rows twice: the active rows when they are fetched for a step, and the
rows a step updated once that update has landed (re-read from the store before the next
selection), so an index updated in place never answers with a row's value from before its
last update.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Iterator

import numpy as np
import torch

from hfs.dist import barrier, is_main
from hfs.fc.common import FCOutput, loss_correct_and_logits, negative_mass_coverage, predict_all_classes
from hfs.fc.layer import selector_upkeep
from hfs.models.heads import MarginHead
from hfs.paramserver.base import HParams, WeightStore


class SampledFC:
    """The classifier layer of sampled (HF-softmax) training; see the module docstring."""

    def __init__(self, store: WeightStore, selector, head: MarginHead, *, matrix: str = "fc",
                 overlap_push: bool = True, lr_scale: float = 1.0, workers: int = 1, allocation=None) -> None:
        self.store, self.selector, self.head, self.matrix = store, selector, head, matrix
        self.allocation = allocation  # a CoverageAllocation steering sample_num (sampler.coverage_target), or None
        self.lr_scale = lr_scale  # the classifier's lr = the schedule's x fc.lr_scale
        self.workers = workers  # ranks pushing to one shared store: it sums their row gradients
        self.num_classes, self.dim = store.shape(matrix)
        self._overlap = overlap_push
        self._pool: ThreadPoolExecutor | None = None
        self._pending: Future | None = None
        self._cycle: list[tuple[np.ndarray, np.ndarray]] = []
        self._refresh_step: int | None = None
        self._updated: tuple[int, np.ndarray] | None = None  # (step, rows) to observe once applied
        self._hparams: HParams | None = None
        self.timers = {"select": 0.0, "observe": 0.0, "refresh": 0.0, "get": 0.0, "push_wait": 0.0}

    # -- per step ----------------------------------------------------------------------
    def set_hparams(self, lr: float, momentum: float, weight_decay: float) -> None:
        """The classifier's lr for the coming step (the trainer's schedule x fc.lr_scale).

        Sent to the store by the next `forward`, right after its `get_rows(step=t)` returned:
        by then every earlier step is applied (by every worker of a shared store), so no step
        in flight is ever applied with the next step's learning rate.
        """
        self._hparams = HParams(lr=lr, momentum=momentum, weight_decay=weight_decay)

    def forward(self, features: torch.Tensor, labels: torch.Tensor, step: int, *,
                last_micro: bool = True, grad_scale: float = 1.0) -> FCOutput:
        """Loss over the active classes of this micro-batch; backward pushes the row gradients."""
        self.settle()
        t0 = time.perf_counter()
        # Only an index needs the features on the host; skip the device-to-host copy otherwise.
        queries = features.detach().float().cpu().numpy() if self.selector.uses_index else None
        labels_np = labels.detach().cpu().numpy().astype(np.int64)
        if self.allocation is None:
            chosen = self.selector.select(queries, labels_np, step)
        else:
            chosen = self.selector.select(queries, labels_np, step, rule=self.allocation.rule(self.selector.rule))
        active, local = chosen
        adjust = getattr(chosen, "logit_adjust", None)  # a plain (active, local) pair has none
        t1 = time.perf_counter()
        values = self.store.get_rows(self.matrix, active, step=step)
        if self._hparams is not None:
            hparams, self._hparams = self._hparams, None
            self.store.set_hparams(self.matrix, hparams)
        t2 = time.perf_counter()
        self.selector.observe(active, values)
        self.timers["select"] += t1 - t0
        self.timers["get"] += t2 - t1
        self.timers["observe"] += time.perf_counter() - t2

        rows = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).to(features.device)
        rows.requires_grad_(True)
        rows.register_hook(self._grad_hook(np.asarray(active, dtype=np.int64), step, last_micro, grad_scale))
        local_t = torch.as_tensor(np.asarray(local, dtype=np.int64), device=features.device)
        loss, correct, logits = loss_correct_and_logits(self.head, features, rows, local_t, adjust)
        if self.allocation is not None and chosen.log_q is not None:
            self.allocation.observe(negative_mass_coverage(logits, local_t, chosen.log_q))
        return FCOutput(loss, correct, int(len(active)))

    __call__ = forward

    def _grad_hook(self, active: np.ndarray, step: int, last_micro: bool, grad_scale: float):
        def hook(grad: torch.Tensor) -> None:
            self._cycle.append((active, grad.detach().float().cpu().numpy()))
            if last_micro:
                self._push_cycle(step, grad_scale)

        return hook

    def _push_cycle(self, step: int, grad_scale: float) -> None:
        """One push per optimizer step; non-finite (fp16-overflowed) gradients push nothing."""
        ids = np.concatenate([a for a, _ in self._cycle])
        grads = np.concatenate([g for _, g in self._cycle])
        self._cycle = []
        if self.selector.uses_index:
            self._updated = (step, np.unique(ids))
        if grad_scale != 1.0:
            grads /= grad_scale
        if not np.isfinite(grads).all():
            # The GradScaler skips this step for the backbone; the store skips it too, but
            # still completes the step so its counter stays in line with the trainer's.
            ids, grads = ids[:0], grads[:0]
        if self._overlap:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hfs-push")
            self._pending = self._pool.submit(self.store.push_grads, self.matrix, ids, grads, step)
        else:
            self.store.push_grads(self.matrix, ids, grads, step)

    def wait(self) -> None:
        """Block until the last push is applied (re-raising its error, if any)."""
        if self._pending is not None:
            t0 = time.perf_counter()
            pending, self._pending = self._pending, None
            pending.result()
            self.timers["push_wait"] += time.perf_counter() - t0

    def end_step(self, step: int) -> None:
        """After an optimizer step: its index refresh runs once its push has landed (see settle)."""
        self._refresh_step = step

    def settle(self) -> None:
        """Wait for the pending push, let the selector see the rows it updated, then its refresh."""
        self.wait()
        self._observe_updated()
        if self._refresh_step is not None:
            step, self._refresh_step = self._refresh_step, None
            t0 = time.perf_counter()
            self.selector.maybe_refresh(step)
            self.timers["refresh"] += time.perf_counter() - t0

    def _observe_updated(self) -> None:
        """The selector sees the values the last step's update gave its rows (no one-update lag)."""
        if self._updated is None:
            return
        (step, rows), self._updated = self._updated, None
        t0 = time.perf_counter()
        values = self.store.get_rows(self.matrix, rows, step=step + 1)
        t1 = time.perf_counter()
        self.selector.observe(rows, values)
        self.timers["get"] += t1 - t0
        self.timers["observe"] += time.perf_counter() - t1

    # -- whole matrix ------------------------------------------------------------------
    def iter_chunks(self, chunk_rows: int = 65536) -> Iterator[tuple[int, np.ndarray]]:
        """The whole matrix in chunks from the store (validation scores against all classes)."""
        self.wait()
        yield from self.store.iter_chunks(self.matrix, chunk_rows)

    def sampler_seconds(self) -> float:
        """Time spent choosing classes and keeping the index fresh (the 'upkeep' share)."""
        return self.timers["select"] + self.timers["observe"] + self.timers["refresh"]

    # -- ClassifierLayer ---------------------------------------------------------------
    @property
    def active_classes(self) -> int:
        return self.selector.sample_num if self.allocation is None else self.allocation.sample_num

    def param_groups(self) -> list[dict[str, Any]]:
        return []  # the rows live in the store, which applies SGD itself

    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        pass

    def grad_scale(self, amp_scale: float) -> float:
        """Pushed row gradients are divided by this: the AMP scale x the ranks the store sums."""
        return amp_scale * self.workers

    def before_step(self, lr: float, momentum: float, weight_decay: float) -> None:
        self.set_hparams(lr * self.lr_scale, momentum, weight_decay)

    def after_backward(self) -> None:
        pass

    def checkpoint_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """The store's own step-named (and pruned) snapshot, taken once every rank's push of
        this step is applied; the rows and their momentum are in it, not in the checkpoint."""
        self.wait()
        barrier()
        snapshot = self.store.snapshot() if is_main() else None
        return {"fc": None, "optimizer": optimizer.state_dict(), "store_snapshot": snapshot}

    def optimizer_state(self, saved: dict[str, Any]) -> dict[str, Any]:
        return saved

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        return predict_all_classes(self.head, features, self.iter_chunks())

    def upkeep(self) -> dict[str, float]:
        upkeep = selector_upkeep(self.selector)
        if self.allocation is not None:  # adaptive allocation: where it stands
            coverage = self.allocation.coverage
            upkeep.update(sample_num=self.allocation.sample_num, coverage=float("nan") if coverage is None else coverage)
        return upkeep

    def close(self) -> None:
        """Finish the pending push and stop the push thread and the selector. Idempotent."""
        try:
            self.wait()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None
            close = getattr(self.selector, "close", None)
            if close is not None:
                close()
