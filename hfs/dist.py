"""torch.distributed plumbing for one process per device: init, collectives, data split.

Every worker that ``hfs train-dist`` starts (through torch's elastic launcher, as
``torchrun`` does) finds its place in the job from the environment the launcher sets:
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR`` and
``MASTER_PORT``. A process started without them is a job of one, so the same trainer code
runs with or without a launcher. Nothing here runs at import: the process group exists only
between :func:`init_distributed` and :func:`destroy_distributed`.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job; a job of one when no launcher started it."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    backend: str = "gloo"

    @property
    def is_main(self) -> bool:
        """Rank 0 alone logs, writes metrics and checkpoints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def device(self) -> torch.device:
        """cuda:LOCAL_RANK for nccl (one GPU per process), cpu for gloo."""
        if self.backend == "nccl":
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        from hfs.utils.errors import HfsError

        raise HfsError(f"environment variable {name}={raw!r} is not an integer") from None


def env_from_os(backend: str = "gloo") -> DistEnv:
    """Read the launcher's env vars; defaults describe a single process."""
    world = _env_int("WORLD_SIZE", 1)
    return DistEnv(rank=_env_int("RANK", 0), world_size=world, local_rank=_env_int("LOCAL_RANK", 0),
                   local_world_size=_env_int("LOCAL_WORLD_SIZE", world), backend=backend)


def init_distributed(backend: str = "gloo", timeout_s: float = 600.0) -> DistEnv:
    """Join the process group described by the environment; a no-op for a job of one.

    The timeout bounds every collective, so a peer that died or hangs ends the job with an
    error instead of blocking the others forever (with nccl, torch's async error handling
    turns the timeout into an abort).
    """
    env = env_from_os(backend)
    if backend == "nccl":
        if not torch.cuda.is_available():
            from hfs.utils.errors import HfsError

            raise HfsError("dist.backend=nccl needs CUDA; use --backend gloo on CPU")
        torch.cuda.set_device(env.local_rank)
    if not env.distributed or dist.is_initialized():
        return env
    timeout = datetime.timedelta(seconds=timeout_s)
    kwargs: dict[str, Any] = {"backend": backend, "timeout": timeout, "rank": env.rank,
                              "world_size": env.world_size}
    if backend == "nccl":
        kwargs["device_id"] = env.device()
    dist.init_process_group(**kwargs)
    log.debug("rank %d/%d joined the %s process group", env.rank, env.world_size, backend)
    return env


def destroy_distributed() -> None:
    """Leave the process group if one is up (idempotent)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    """True on rank 0, and in a process that is not part of a group."""
    return get_rank() == 0


def barrier() -> None:
    """Wait for every rank; a no-op outside a group."""
    if is_initialized():
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s picklable ``obj`` on every rank (e.g. a resume path, a run id)."""
    if not is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_sum(values: Sequence[float], device: torch.device | None = None) -> list[float]:
    """Sum a few scalars over ranks (validation counts, metric totals) in one collective."""
    if not is_initialized():
        return [float(v) for v in values]
    if device is None and dist.get_backend() == "nccl":  # nccl reduces GPU tensors only
        device = torch.device("cuda", torch.cuda.current_device())
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


# --------------------------------------------------------------------------- all-gather


def _gather_into(out: torch.Tensor, tensor: torch.Tensor) -> None:
    """Equal-size all-gather into one tensor (``all_gather_single`` where torch has it)."""
    (getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor)(out, tensor)


def _reduce_scatter_into(out: torch.Tensor, tensor: torch.Tensor) -> None:
    """Summing reduce-scatter of one tensor (``reduce_scatter_single`` where torch has it)."""
    (getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor)(out, tensor, op=dist.ReduceOp.SUM)


class AllGatherWithGrad(torch.autograd.Function):
    """Concatenate every rank's tensor along dim 0; gradients flow back to their owner.

    Every rank uses the whole gathered tensor (e.g. the sharded classifier scores all
    features against its rows), so the gradient for rank r's slice is the *sum* over
    ranks of the gradients w.r.t. that slice: a reduce-scatter (nccl) or an all-reduce
    followed by taking one's own slice (gloo, which has no reduce-scatter).
    All ranks must pass tensors of the same shape.
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        world = dist.get_world_size()
        tensor = tensor.contiguous()
        out = torch.empty((world * tensor.shape[0], *tensor.shape[1:]), dtype=tensor.dtype,
                          device=tensor.device)
        _gather_into(out, tensor)
        ctx.rows = tensor.shape[0]
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        rank, rows = dist.get_rank(), ctx.rows
        grad = grad.contiguous()
        if dist.get_backend() == "nccl":
            mine = torch.empty((rows, *grad.shape[1:]), dtype=grad.dtype, device=grad.device)
            _reduce_scatter_into(mine, grad)
            return mine
        summed = grad.clone()
        dist.all_reduce(summed, op=dist.ReduceOp.SUM)
        return summed[rank * rows:(rank + 1) * rows].contiguous()


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """All ranks' ``tensor`` concatenated in rank order, differentiable (see AllGatherWithGrad)."""
    if not is_initialized() or get_world_size() == 1:
        return tensor
    return AllGatherWithGrad.apply(tensor)


def all_gather_no_grad(tensor: torch.Tensor) -> torch.Tensor:
    """All ranks' ``tensor`` concatenated in rank order (labels, ids: no gradient)."""
    if not is_initialized() or get_world_size() == 1:
        return tensor
    tensor = tensor.contiguous()
    out = torch.empty((get_world_size() * tensor.shape[0], *tensor.shape[1:]), dtype=tensor.dtype,
                      device=tensor.device)
    _gather_into(out, tensor)
    return out


class ScaleGrad(torch.autograd.Function):
    """Identity forward; the gradient is multiplied by ``factor`` on the way back."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.factor, None


def scale_grad(tensor: torch.Tensor, factor: float) -> torch.Tensor:
    """Identity forward, gradient times ``factor`` (to undo DDP's averaging where a loss is
    already global, as the sharded classifier's is)."""
    if factor == 1.0:
        return tensor
    return ScaleGrad.apply(tensor, factor)


# --------------------------------------------------------------------------- data split


def eval_indices(dataset_len: int, env: DistEnv) -> tuple[list[int], int]:
    """This rank's validation items and how many of them count.

    Rank r takes r, r+W, ...; the list is padded (repeating its first item) to the same
    length on every rank, because collectives such as the sharded classifier's predict
    need equal batches everywhere; only the first ``valid`` items are scored, so summed
    counts over ranks score every item exactly once. (Training order lives in
    :mod:`hfs.train.data_order`, which splits each global batch between ranks.)
    """
    mine = list(range(env.rank, dataset_len, env.world_size))
    per_rank = -(-dataset_len // env.world_size)
    valid = len(mine)
    return mine + [mine[0] if mine else 0] * (per_rank - valid), valid
