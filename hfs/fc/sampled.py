"""SampledFC: HF-softmax over the active classes, with the full matrix and its index in a weight store.

Per optimizer step, one round trip: ``store.select`` sends the batch's features and labels,
the store answers the active classes (positives, nearest negatives from the index it keeps
over its own rows, uniform fill, by the one ``SelectionRule``) together with their rows; the
head runs on them, and a gradient hook on the fetched rows sends the rows' gradients back
with ``push_grads``, which the store applies with SGD — and where it measures the index's
drift and refreshes it. The trainer holds only ``sample_num`` rows at a time and no index:
nothing of its state grows with the number of classes, and N trainers share one index.

Gradient accumulation: every micro-batch of a cycle selects at the same store step (no
update lands inside a cycle, as for the backbone), and the row gradients of all micro-batches
are concatenated into ONE push when the last micro-batch's backward runs; rows active in
several micro-batches add up in the store, exactly as their gradients would in one big batch.
The push runs on a background thread so it overlaps the backbone's backward pass, its
optimizer step, the next batch's loading and the next backbone forward. It is waited for
before the next selection, a snapshot or a validation pass.

A store that pipelines pushes (the ZeroMQ client's ``paramserver.pipeline_pushes``) needs no
thread: the push is sent from the training thread right after the backward pass and returns
at once; the next selection on the same connection collects its reply (and sees it applied),
and ``wait`` (snapshot, validation, close) flushes it.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Iterator

import numpy as np
import torch

from hfs.dist import barrier, is_main
from hfs.fc.common import FCOutput, loss_and_correct, predict_all_classes
from hfs.fc.layer import index_upkeep
from hfs.models.heads import MarginHead
from hfs.paramserver.base import HParams, WeightStore
from hfs.samplers.selection import SelectionRule

log = logging.getLogger(__name__)


class SampledFC:
    """The classifier layer of sampled (HF-softmax) training; see the module docstring.

    ``rule`` turns each batch's labels and the store's candidates into the active classes;
    ``neighbours`` is how many candidates each feature asks the store's index for (0: none,
    uniform negatives only — the ``random`` sampler, or every class active).
    """

    def __init__(self, store: WeightStore, head: MarginHead, *, rule: SelectionRule, neighbours: int = 0,
                 matrix: str = "fc", overlap_push: bool = True, lr_scale: float = 1.0, workers: int = 1) -> None:
        self.store, self.head, self.matrix = store, head, matrix
        self.rule, self.neighbours = rule, int(neighbours)
        self.lr_scale = lr_scale  # the classifier's lr = the schedule's x fc.lr_scale
        self.workers = workers  # ranks pushing to one shared store: it sums their row gradients
        self.num_classes, self.dim = store.shape(matrix)
        self._pipelined = store.pipelines_pushes
        self._overlap = overlap_push and not self._pipelined
        self._ready: tuple[int, float] | None = None  # a finished cycle whose push is still to be sent
        self._pool: ThreadPoolExecutor | None = None
        self._pending: Future | None = None
        self._cycle: list[tuple[np.ndarray, np.ndarray]] = []
        self._hparams: HParams | None = None
        self._warned_overflow = False
        self.timers = {"select": 0.0, "push_wait": 0.0}
        self._rule_stats: dict[str, list[float]] = {}
        self._negatives: set[int] = set()

    # -- per step ----------------------------------------------------------------------
    def set_hparams(self, lr: float, momentum: float, weight_decay: float) -> None:
        """The classifier's lr for the coming step (the trainer's schedule x fc.lr_scale).

        Sent to the store by the next `forward`, right after its `select(step=t)` returned:
        by then every earlier step is applied (by every worker of a shared store), so no step
        in flight is ever applied with the next step's learning rate.
        """
        self._hparams = HParams(lr=lr, momentum=momentum, weight_decay=weight_decay)

    def forward(self, features: torch.Tensor, labels: torch.Tensor, step: int, *,
                last_micro: bool = True, grad_scale: float = 1.0) -> FCOutput:
        """Loss over the active classes of this micro-batch; backward pushes the row gradients."""
        self.settle()
        t0 = time.perf_counter()
        queries = features.detach().float().cpu().numpy()
        chosen, values = self.store.select(self.matrix, queries, labels.detach().cpu().numpy().astype(np.int64),
                                           step, self.rule, self.neighbours)
        if self._hparams is not None:
            hparams, self._hparams = self._hparams, None
            self.store.set_hparams(self.matrix, hparams)
        self.timers["select"] += time.perf_counter() - t0
        active, local = chosen.active, chosen.local
        self._watch(chosen, queries)
        if len(active) > self.rule.sample_num and not self._warned_overflow:
            self._warned_overflow = True
            log.warning(
                "batch at step %d has %d distinct labels, more than sample_num=%d: keeping all positives (said once)",
                step, len(active), self.rule.sample_num)

        rows = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).to(features.device)
        rows.requires_grad_(True)
        rows.register_hook(self._grad_hook(np.asarray(active, dtype=np.int64), step, last_micro, grad_scale))
        local_t = torch.as_tensor(np.asarray(local, dtype=np.int64), device=features.device)
        adjust = None
        if chosen.logit_adjust is not None:
            adjust = torch.as_tensor(np.asarray(chosen.logit_adjust, dtype=np.float32), device=features.device)
        loss, correct = loss_and_correct(self.head, features, rows, local_t, logit_adjust=adjust)
        return FCOutput(loss, correct, int(len(active)))

    __call__ = forward

    def _watch(self, chosen, queries: np.ndarray) -> None:
        """What the log reports of the selection: the rule's own measures, the distinct negatives of the
        window and the spread of the batch's features (mean pairwise cosine: it climbs when an
        embedding collapses into a cone)."""
        for key, value in chosen.stats.items():
            self._rule_stats.setdefault(key, []).append(float(value))
        positive = np.zeros(len(chosen.active), dtype=bool)
        positive[chosen.local[chosen.local >= 0]] = True
        self._negatives.update(chosen.active[~positive].tolist())
        unit = queries / np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-12)
        n = len(unit)
        if n > 1 and np.isfinite(unit).all():  # (an overflowed fp16 step has no spread to speak of)
            total = float(np.square(unit.sum(axis=0)).sum())
            self._rule_stats.setdefault("feature_cosine", []).append((total - n) / (n * (n - 1)))

    def _grad_hook(self, active: np.ndarray, step: int, last_micro: bool, grad_scale: float):
        def hook(grad: torch.Tensor) -> None:
            self._cycle.append((active, grad.detach().float().cpu().numpy()))
            if last_micro and self._pipelined:
                self._ready = (step, grad_scale)  # sent from the training thread: its connection keeps the order
            elif last_micro:
                self._push_cycle(step, grad_scale)

        return hook

    def _push_cycle(self, step: int, grad_scale: float) -> None:
        """One push per optimizer step; non-finite (fp16-overflowed) gradients push nothing."""
        ids = np.concatenate([a for a, _ in self._cycle])
        grads = np.concatenate([g for _, g in self._cycle])
        self._cycle = []
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

    def _send_ready(self) -> None:
        """Send the finished cycle's push (pipelining store: returns once sent)."""
        if self._ready is not None:
            step, grad_scale = self._ready
            self._ready = None
            self._push_cycle(step, grad_scale)

    def wait(self) -> None:
        """Block until the last push is applied (re-raising its error, if any)."""
        self._send_ready()
        t0 = time.perf_counter()
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()
        if self._pipelined:
            self.store.flush()
        self.timers["push_wait"] += time.perf_counter() - t0

    def end_step(self, step: int) -> None:
        """After an optimizer step: send a push not sent yet — the store refreshes its index where it applies the step."""
        self._send_ready()

    def settle(self) -> None:
        """Before a selection: the last push is sent, and (on a background thread) done; a
        pipelining store's selection collects its reply on the same connection."""
        if self._pipelined:
            self._send_ready()
        else:
            self.wait()

    # -- whole matrix ------------------------------------------------------------------
    def iter_chunks(self, chunk_rows: int = 65536) -> Iterator[tuple[int, np.ndarray]]:
        """The whole matrix in chunks from the store (validation scores against all classes)."""
        self.wait()
        yield from self.store.iter_chunks(self.matrix, chunk_rows)

    def sampler_seconds(self) -> float:
        """Seconds this process spent keeping an index fresh (the 'upkeep' share): the in-process
        store's index upkeep; none with `hfs serve-params`, whose shards keep the index."""
        return float(self.index_stats().get("fg_seconds", 0.0))

    def index_stats(self) -> dict:
        """The store's index of this matrix: builds, drift, readiness, background seconds ({} without one)."""
        self.wait()
        return self.store.index_stats(self.matrix)

    # -- ClassifierLayer ---------------------------------------------------------------
    @property
    def active_classes(self) -> int:
        return self.rule.sample_num

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
        """Send the step's push now, so the store's update overlaps the optimizer step and the next batch."""
        self._send_ready()

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
        """The store's index as the log line names it (empty without an index), and the selection
        rule's measurements (``select_*``: means over the steps since the last call)."""
        stats = {f"select_{key}": float(np.mean(values)) for key, values in self._rule_stats.items()}
        if self._negatives:
            stats["select_distinct_negatives"] = float(len(self._negatives))
        self._rule_stats, self._negatives = {}, set()
        return {**(index_upkeep(self.index_stats()) if self.neighbours else {}), **stats}

    def close(self) -> None:
        """Finish the pending push and stop the push thread. Idempotent."""
        try:
            self.wait()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None
