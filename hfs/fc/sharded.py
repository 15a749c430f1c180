"""ShardedFC (``fc.mode: sharded``): the classifier split by rows across ranks, no server.

The layout Partial FC uses to reach tens of millions of classes on many GPUs:

* rank r of W owns the contiguous rows ``[r*C//W, (r+1)*C//W)`` as a local parameter,
  trained by the trainer's optimizer. ``fc.sharded_momentum=dense`` (the default) moves the
  whole shard every step, as Partial FC v2 does; with ``lazy`` SGD's momentum and weight
  decay act only on the rows active in the step (``take_active_rows`` feeds
  :class:`~hfs.train.optim.RowSparseSGD`), the weight store's rule in sampled mode. With
  ``sample_num >= C`` both are exactly the full softmax;
* features are all-gathered *with gradient* (:class:`~hfs.dist.AllGatherWithGrad`)
  and labels without, so every rank scores the whole global batch against its rows;
* each rank picks its active rows inside its shard: every positive that falls in the shard,
  then negatives up to its share of ``fc.sample_num``. ``sample_num`` is global: rank r
  takes ``ceil(sample_num * shard_rows / C)`` rows, so the total active set does not
  change with the world size. Without a selector the negatives are uniform random rows
  (Partial FC's rule, :func:`select_shard_rows`); with one (``sampler.type`` annoy, hnsw
  or exact, attached by the trainer) they are the shard's rows nearest to the global
  batch's features, found by this rank's own index over its own shard
  (:class:`ShardView` makes the shard look like a weight-store matrix of ``shard_rows``
  rows with shard-local ids, so ``hfs.samplers.build_selector`` — the same
  :class:`~hfs.samplers.OwnedIndex` a weight store keeps over its rows, plus the one shared
  selection rule — serves it unchanged). The all-gathered features are the same on every
  rank, so each shard's active set depends only on that shard and its index;
* the margin head runs on those rows with ``local_labels == -1`` where a sample's positive
  lives on another rank, and the softmax normaliser is reduced across ranks
  (:class:`DistCrossEntropy`: all-reduce of the max, of the sum of exponentials and of the
  positive logit), so the loss is the global batch's mean cross-entropy on every rank.

Gradients: the shard's rows get the exact gradient of the global loss. The features'
gradient comes back through the all-gather summed over ranks, i.e. exact too; because the
backbone is wrapped in DistributedDataParallel, which *averages* gradients over ranks, the
features' gradient is multiplied by W on the way back (``ddp_average=True``), so the
backbone's update equals the single-process update on the global batch.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from hfs.dist import (all_gather_no_grad, all_gather_with_grad, get_rank, get_world_size, is_initialized,
                      scale_grad)
from hfs.fc.common import adjusted
from hfs.fc.layer import selector_upkeep
from hfs.paramserver.sharding import ShardSpec

if TYPE_CHECKING:
    from hfs.config import SamplerConfig
    from hfs.samplers import ActiveClassSelector


def shard_bounds(num_classes: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rows ``[start, end)`` of rank ``rank``: contiguous, sizes differ by at most one; the weight
    store's row split (:mod:`hfs.paramserver.sharding`), so a rank's shard is that store shard's rows."""
    return ShardSpec(rank, world_size).row_range(num_classes)


def shard_sample_num(sample_num: int, num_classes: int, shard_rows: int) -> int:
    """This rank's share of the global ``sample_num`` (never more than its rows)."""
    return min(shard_rows, math.ceil(sample_num * shard_rows / num_classes))


def _all_reduce(tensor: torch.Tensor, op) -> torch.Tensor:
    if is_initialized() and get_world_size() > 1:
        dist.all_reduce(tensor, op=op)
    return tensor


class DistCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of a softmax whose columns are spread over ranks.

    ``logits`` (N, S_r) are this rank's columns for all N samples of the global batch;
    ``local_labels`` (N,) is the positive's column here, or -1 where it lives elsewhere
    (each sample's positive lives on exactly one rank). Forward: the global max, the
    global sum of exponentials and the positive logit are all-reduced, and
    ``loss_i = log(sum_i) + max_i - logit_pos_i``. Backward: ``softmax - onehot`` on this
    rank's columns, divided by N; no communication is needed.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, local_labels: torch.Tensor) -> torch.Tensor:
        n = logits.shape[0]
        row_max = _all_reduce(logits.detach().max(dim=1).values, dist.ReduceOp.MAX)
        exp = (logits.detach() - row_max[:, None]).exp_()
        has = local_labels >= 0
        rows = torch.nonzero(has, as_tuple=True)[0]
        pos = torch.zeros(n, dtype=logits.dtype, device=logits.device)
        pos[rows] = logits.detach()[rows, local_labels[rows]]
        sums = _all_reduce(torch.stack([exp.sum(dim=1), pos]), dist.ReduceOp.SUM)
        exp.div_(sums[0][:, None])  # now the softmax probabilities of this rank's columns
        loss = (sums[0].log() + row_max - sums[1]).mean()
        ctx.save_for_backward(exp, local_labels)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        probs, local_labels = ctx.saved_tensors
        grad = probs.clone()
        rows = torch.nonzero(local_labels >= 0, as_tuple=True)[0]
        grad[rows, local_labels[rows]] -= 1.0
        grad.mul_(grad_loss / probs.shape[0])
        return grad, None


def dist_cross_entropy(logits: torch.Tensor, local_labels: torch.Tensor) -> torch.Tensor:
    """The global batch's mean cross-entropy over columns sharded across ranks."""
    return DistCrossEntropy.apply(logits, local_labels)


def select_shard_rows(labels: torch.Tensor, start: int, end: int, count: int,
                      generator: torch.Generator | None = None) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Active rows of one shard and the labels remapped into them (Partial FC's rule).

    Every positive in ``[start, end)`` is kept, then uniform random rows fill up to
    ``count`` (more positives than ``count`` keeps them all). Returns (sorted shard-local
    row ids, or None meaning "the whole shard"; local labels with -1 where the positive is
    on another shard).
    """
    rows = end - start
    here = (labels >= start) & (labels < end)
    shard_labels = torch.where(here, labels - start, torch.full_like(labels, -1))
    if count >= rows:
        return None, shard_labels
    positives = torch.unique(shard_labels[here])
    count = max(count, positives.numel())
    score = torch.rand(rows, device=labels.device, generator=generator)
    score[positives] = 2.0  # positives first, then the highest random scores
    index = torch.topk(score, k=count, sorted=False).indices.sort().values
    local = torch.full_like(labels, -1)
    local[here] = torch.searchsorted(index, shard_labels[here])
    return index, local


class ShardView:
    """One rank's shard as a read-only weight-store matrix: what a sampler index is built from.

    ``hfs.samplers.build_selector`` reads a matrix through ``shape``/``iter_chunks`` (and
    benchmarks through ``get_rows``); this view serves the live shard parameter of ``fc``
    with row ids local to the shard (0 .. shard_rows-1). Chunks are float32 copies, since
    a background rebuild copies its snapshot over several steps while SGD updates the
    parameter in place.
    """

    def __init__(self, fc: "ShardedFC", matrix: str = "fc") -> None:
        self._fc, self.matrix = fc, matrix

    def _weight(self, name: str) -> torch.Tensor:
        if name != self.matrix:
            raise KeyError(f"the shard view serves matrix '{self.matrix}', not '{name}'")
        return self._fc.weight.detach()

    def shape(self, name: str) -> tuple[int, int]:
        rows, dim = self._weight(name).shape
        return int(rows), int(dim)

    def get_rows(self, name: str, rows: np.ndarray, step: int | None = None) -> np.ndarray:
        """Current values of shard-local ``rows`` (``step`` is accepted for the store
        signature: the shard is updated in this process, so there is nothing to wait for)."""
        weight = self._weight(name)
        index = torch.as_tensor(np.asarray(rows, dtype=np.int64), device=weight.device)
        self._fc.current(index)
        return weight[index].float().cpu().numpy()

    def iter_chunks(self, name: str, chunk_rows: int = 65536) -> Iterator[tuple[int, np.ndarray]]:
        weight = self._weight(name)
        for first in range(0, weight.shape[0], chunk_rows):
            last = min(first + chunk_rows, weight.shape[0])
            self._fc.current(torch.arange(first, last, device=weight.device))
            yield first, weight[first:last].to("cpu", torch.float32, copy=True).numpy()


class ShardedFC(nn.Module):
    """This rank's shard of the classifier; see the module docstring for the layout."""

    def __init__(self, shard_rows: torch.Tensor, num_classes: int, head: nn.Module, *, sample_num: int,
                 seed: int = 0, ddp_average: bool = True, lr_scale: float = 1.0,
                 momentum_rule: str = "catchup") -> None:
        super().__init__()
        self.lr_scale, self.momentum_rule = lr_scale, momentum_rule
        self.rank, self.world_size = get_rank(), get_world_size()
        self.num_classes = num_classes
        self.start, self.end = shard_bounds(num_classes, self.rank, self.world_size)
        if shard_rows.shape[0] != self.end - self.start:
            raise ValueError(f"rank {self.rank} owns rows [{self.start}, {self.end}) of {num_classes}; "
                             f"got {shard_rows.shape[0]} rows")
        self.head = head
        self.weight = nn.Parameter(shard_rows)
        self._global_sample_num = min(sample_num, num_classes)
        self.sample_num = shard_sample_num(sample_num, num_classes, self.end - self.start)
        self.seed, self.ddp_average = seed, ddp_average
        self.selector: ActiveClassSelector | None = None
        self._optimizer: Any = None  # the RowSparseSGD that catches rows up (momentum_rule=catchup)
        self.timers = {"select": 0.0, "refresh": 0.0}
        # rows active since the optimizer last asked (micro-batches of one step add up)
        self._touched = torch.zeros(self.end - self.start, dtype=torch.bool, device=shard_rows.device)

    @property
    def shard_rows(self) -> int:
        return self.end - self.start

    @property
    def active_classes(self) -> int:
        """The global ``sample_num`` share summed over ranks would need a collective; this
        is what the run summary reports: ``fc.sample_num`` capped at C."""
        return self._global_sample_num

    def attach_selector(self, selector: "ActiveClassSelector") -> None:
        """Pick negatives through ``selector`` (an index over :class:`ShardView` of this
        layer, asked for this rank's share ``self.sample_num``) instead of at random."""
        if selector.num_classes != self.shard_rows:
            raise ValueError(f"the selector indexes {selector.num_classes} rows, this shard has {self.shard_rows}")
        self.selector = selector

    def _generator(self, step: int) -> torch.Generator:
        """A per-(seed, step, rank) stream: deterministic and resumable, different per rank."""
        gen = torch.Generator(device=self.weight.device)
        gen.manual_seed((self.seed * 1_000_003 + step) * 4096 + self.rank)
        return gen

    def forward(self, features: torch.Tensor, labels: torch.Tensor, step: int = 0, *,
                last_micro: bool = True, grad_scale: float = 1.0):
        """The trainer's classifier call (same signature as FullFC/SampledFC) -> FCOutput.

        The shard is a parameter of the trainer's optimizer (unscaled by the AMP scaler
        like FullFC's), so ``grad_scale`` and ``last_micro`` need no handling here.
        """
        from hfs.fc.common import FCOutput

        loss, correct, active = self.loss_and_correct(features, labels, step)
        return FCOutput(loss, correct, active)

    def loss_and_correct(self, features: torch.Tensor, labels: torch.Tensor,
                         step: int = 0) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(global batch's mean loss, same on every rank; top-1 hits among this rank's own
        samples; active rows of this shard — no extra sync to count the other ranks')."""
        if self.ddp_average:
            features = scale_grad(features, float(self.world_size))
        all_features = all_gather_with_grad(features).float()
        all_labels = all_gather_no_grad(labels)
        index, local, adjust = self._select(all_features.detach(), all_labels, step)
        self.current(index)
        self._touched[slice(None) if index is None else index] = True
        rows = self.weight if index is None else self.weight[index]
        with torch.autocast(device_type=all_features.device.type, enabled=False):
            logits = adjusted(self.head(all_features, rows.float(), local), adjust)  # sampler.logq
            loss = dist_cross_entropy(logits, local)
            correct = self._own_correct(all_features.detach(), rows.detach().float(), local, labels.shape[0])
        return loss, correct, int(rows.shape[0])

    def _select(self, all_features: torch.Tensor, all_labels: torch.Tensor,
                step: int) -> tuple[torch.Tensor | None, torch.Tensor, np.ndarray | None]:
        """(active shard-local rows or None for the whole shard, local labels, the rule's logit
        adjustment or None): Partial FC's random rule without a selector, the selector's
        hard negatives with one."""
        if self.selector is None:
            return (*select_shard_rows(all_labels, self.start, self.end, self.sample_num, self._generator(step)), None)
        t0 = time.perf_counter()
        here = (all_labels >= self.start) & (all_labels < self.end)
        shard_labels = torch.where(here, all_labels - self.start, torch.full_like(all_labels, -1))
        chosen = self.selector.select(all_features.float().cpu().numpy(), shard_labels.cpu().numpy().astype(np.int64),
                                      step)
        active, local = chosen
        adjust = getattr(chosen, "logit_adjust", None)
        if self.selector.uses_index:  # its drift tracker / in-place updates see the rows used
            self.selector.observe(active, ShardView(self).get_rows("fc", active))
        self.timers["select"] += time.perf_counter() - t0
        local_t = torch.from_numpy(local).to(all_labels.device)
        if len(active) == self.shard_rows and np.array_equal(active, np.arange(self.shard_rows)):
            return None, local_t, None  # the whole shard, in order: use the parameter as it is
        return torch.from_numpy(active).to(self.weight.device), local_t, adjust

    def end_step(self, step: int) -> None:
        """After the optimizer step: let the selector advance, swap in or start an index rebuild."""
        if self.selector is not None:
            t0 = time.perf_counter()
            self.selector.maybe_refresh(step)
            self.timers["refresh"] += time.perf_counter() - t0

    def take_active_rows(self) -> torch.Tensor | None:
        """Shard-local rows active since the last call (None: all of them), then forget them.

        The optimizer's row-sparse update (``fc.sharded_momentum=lazy``) applies SGD to these
        rows only, as the weight store does in sampled mode."""
        rows = None if bool(self._touched.all()) else torch.nonzero(self._touched, as_tuple=True)[0]
        self._touched.zero_()
        return rows

    def sampler_seconds(self) -> float:
        """Time spent choosing rows and keeping the index fresh (the 'upkeep' share)."""
        return self.timers["select"] + self.timers["refresh"]

    def close(self) -> None:
        """Stop the selector's build in flight and release its index. Idempotent."""
        if self.selector is not None:
            self.selector.close()

    # -- ClassifierLayer ---------------------------------------------------------------
    def param_groups(self) -> list[dict[str, Any]]:
        return [{"params": [self.weight], "lr_scale": self.lr_scale}]

    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """``fc.sharded_momentum`` lazy or catchup: the optimizer updates the step's active rows only
        (catchup: and the others catch up on dense SGD's steps when read). Dense, and any rule
        under an optimizer without row-sparse updates (AdamW), leave torch's dense update."""
        self._param_index = _index_in(optimizer, self.weight)  # where its momentum is in the optimizer's state
        if self.momentum_rule == "dense" or not hasattr(optimizer, "update_rows_of"):
            return
        optimizer.update_rows_of(self.weight, self.take_active_rows, catch_up=self.momentum_rule == "catchup")
        if self.momentum_rule == "catchup":
            self._optimizer = optimizer

    def current(self, index: torch.Tensor | None = None) -> None:
        """Bring rows ``index`` (None: the whole shard) to the last step before they are read
        (``fc.sharded_momentum=catchup``; a no-op under the other rules)."""
        if self._optimizer is not None:
            self._optimizer.catch_up(self.weight, index)

    def grad_scale(self, amp_scale: float) -> float:
        return amp_scale  # a parameter of the trainer's optimizer, unscaled with the backbone

    def before_step(self, lr: float, momentum: float, weight_decay: float) -> None:
        pass

    def after_backward(self) -> None:
        pass  # the shard's gradient is exact on each rank: nothing to average

    def checkpoint_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """The whole matrix and its momentum in global row order (rank 0; None elsewhere).

        Under catchup every row is brought current and the step history forgotten first, so a
        run resumed from this checkpoint continues exactly as the uninterrupted one."""
        if self._optimizer is not None:
            self._optimizer.catch_up_all(self.weight)
        return {"fc": {"weight": self.full_weight()}, "optimizer": self._full_optimizer_state(optimizer),
                "store_snapshot": None}

    def optimizer_state(self, saved: dict[str, Any]) -> dict[str, Any]:
        """A checkpoint's optimizer state with the shard's per-row state (SGD's momentum, AdamW's
        two moments) cut to this rank's rows."""
        return split_state_rows(saved, self._param_index, self.num_classes,
                                lambda full: shard_of(full, self.num_classes))

    def _full_optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict | None:
        """The optimizer state with the shard's per-row state whole, in global row order, on rank 0."""
        state = split_state_rows(optimizer.state_dict(), self._param_index, self.weight.shape[0],
                                 lambda shard: gather_shards(shard, self.num_classes))
        return state if get_rank() == 0 else None

    def upkeep(self) -> dict[str, float]:
        return selector_upkeep(self.selector)

    @torch.no_grad()
    def _own_correct(self, features: torch.Tensor, rows: torch.Tensor, local: torch.Tensor, own: int) -> torch.Tensor:
        """Top-1 hits (margin-free score over the global active set) among this rank's samples."""
        sim = self.head.similarity(features, rows)
        best = _all_reduce(sim.max(dim=1).values, dist.ReduceOp.MAX)
        has = torch.nonzero(local >= 0, as_tuple=True)[0]
        pos = torch.full_like(best, -float("inf"))
        pos[has] = sim[has, local[has]]
        pos = _all_reduce(pos, dist.ReduceOp.MAX)
        hits = pos >= best
        return hits[self.rank * own:(self.rank + 1) * own].sum()

    @torch.no_grad()
    def predict(self, features: torch.Tensor, chunk_rows: int = 65536) -> torch.Tensor:
        """Top-1 class over all C classes for this rank's ``features`` (every rank must call
        with the same number of rows): each rank scores its shard, the best wins."""
        all_features = all_gather_no_grad(features.float().contiguous())
        best_score = torch.full((all_features.shape[0],), -float("inf"), device=all_features.device)
        best_id = torch.full((all_features.shape[0],), -1, dtype=torch.long, device=all_features.device)
        for first, rows in self.iter_local_chunks(chunk_rows):
            score, idx = self.head.similarity(all_features, rows.float()).max(dim=1)
            better = score > best_score
            best_score = torch.where(better, score, best_score)
            best_id = torch.where(better, idx + first, best_id)
        scores = all_gather_no_grad(best_score[None])  # (W, N)
        ids = all_gather_no_grad(best_id[None])
        winner = scores.argmax(dim=0)
        chosen = ids.gather(0, winner[None])[0]
        own = features.shape[0]
        return chosen[self.rank * own:(self.rank + 1) * own]

    def full_weight(self) -> torch.Tensor | None:
        """The whole matrix in global row order on rank 0 (None elsewhere); every rank calls."""
        self.current()
        return gather_shards(self.weight, self.num_classes)

    @torch.no_grad()
    def load_full_weight(self, full: torch.Tensor) -> None:
        """Take this rank's rows of a full matrix saved with any world size."""
        if full.shape != (self.num_classes, self.weight.shape[1]):
            raise ValueError(f"classifier matrix of shape {tuple(full.shape)} does not fit "
                             f"{self.num_classes} classes x {self.weight.shape[1]} dims")
        self.weight.copy_(shard_of(full, self.num_classes))

    def iter_local_chunks(self, chunk_rows: int = 65536) -> Iterator[tuple[int, torch.Tensor]]:
        """(first global row, rows) chunks of this rank's shard."""
        self.current()
        w = self.weight.detach()
        for first in range(0, w.shape[0], chunk_rows):
            yield self.start + first, w[first:first + chunk_rows]


def build_shard_selector(sampler_cfg: "SamplerConfig", fc: ShardedFC, batch_size: int, *, seed: int,
                         metric: str) -> "ActiveClassSelector | None":
    """The selector of ``fc``'s hard negatives, or None for ``sampler.type: random``.

    It is ``hfs.samplers.build_selector`` over :class:`ShardView` (shard-local ids) with
    the shard's own sizes: ``sample_num`` is this rank's share (``ShardedFC.sample_num``)
    and the queries are the all-gathered global batch, ``batch_size x W`` (``batch_size``
    is the per-rank micro-batch; ``sampler.k = 0`` sizes candidates for it). ``seed`` seeds
    this rank's random fill (the trainer passes ``sampler.seed + rank``).
    """
    if sampler_cfg.type == "random":
        return None
    from hfs.samplers import build_selector

    view = ShardView(fc)
    return build_selector(sampler_cfg, store=view, matrix=view.matrix, num_classes=fc.shard_rows,
                          sample_num=fc.sample_num, queries_per_step=batch_size * fc.world_size, seed=seed,
                          metric=metric)


# --------------------------------------------------------------------------- world-size independence


def split_state_rows(state: dict, index: int, rows: int, transform: Callable[[torch.Tensor], torch.Tensor]) -> dict:
    """The optimizer state with every per-row tensor of parameter ``index`` passed through ``transform``.

    Per-row tensors are those whose first dimension is ``rows`` (SGD's momentum buffer,
    AdamW's two moments); scalars such as AdamW's step count are kept. The sharded
    classifier uses it to gather its state whole for a checkpoint and to cut it to a rank's
    shard on resume.
    """
    per_param = dict(state["state"])
    entry = per_param.get(index)
    if not entry:
        return state
    per_param[index] = {k: transform(v) if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == rows else v
                        for k, v in entry.items()}
    return {**state, "state": per_param}


def _index_in(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> int:
    """``param``'s key in ``optimizer.state_dict()["state"]`` (parameters numbered across groups)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return next(i for i, p in enumerate(params) if p is param)


def init_shard_rows(start: int, end: int, dim: int, init: str, std: float, seed: int,
                    block_rows: int = 65536) -> torch.Tensor:
    """Rows ``[start, end)`` of a seeded initial matrix that is the same for every world size.

    The matrix is generated in fixed blocks of ``block_rows`` rows, block b from seed
    ``(seed, b)``, so a rank materialises only the blocks its shard touches (never the
    whole C x D matrix) and W ranks together hold exactly the matrix one rank would.
    """
    from hfs.fc.common import init_rows

    parts = []
    for block in range(start // block_rows, -(-end // block_rows)):
        first = block * block_rows
        rows = init_rows(block_rows, dim, init, std, seed * 1_000_003 + block)
        lo, hi = max(start, first) - first, min(end, first + block_rows) - first
        parts.append(rows[lo:hi])
    return torch.cat(parts) if parts else torch.empty(0, dim)


def gather_shards(shard: torch.Tensor, num_classes: int) -> torch.Tensor | None:
    """The full (C, ...) tensor in global row order on rank 0 (None elsewhere); every rank calls.

    Checkpoints hold the whole matrix (and its momentum) this way, so a run saved on W
    ranks resumes on any other number.
    """
    world, rank = get_world_size(), get_rank()
    if world == 1 or not is_initialized():
        return shard.detach().clone()
    longest = -(-num_classes // world)
    padded = shard.new_zeros((longest, *shard.shape[1:]))
    padded[:shard.shape[0]] = shard.detach()
    gathered = [torch.empty_like(padded) for _ in range(world)] if rank == 0 else None
    dist.gather(padded, gathered, dst=0)
    if rank != 0:
        return None
    parts = []
    for r, part in enumerate(gathered):
        start, end = shard_bounds(num_classes, r, world)
        parts.append(part[:end - start])
    return torch.cat(parts)


def shard_of(full: torch.Tensor, num_classes: int) -> torch.Tensor:
    """This rank's rows of a full (C, ...) tensor (loading a checkpoint on any world size)."""
    if full.shape[0] != num_classes:
        raise ValueError(f"expected {num_classes} rows, got {full.shape[0]}")
    start, end = shard_bounds(num_classes, get_rank(), get_world_size())
    return full[start:end].clone()
