"""The trainer's optimizer: SGD (with optional row-sparse updates for a sharded classifier) or AdamW.

:func:`build_optimizer` is the one place the optimizer is chosen (``optim.name``),
:func:`store_sgd_hparams` what the weight store's SGD gets in sampled mode, and
:func:`clip_backbone_grads` the gradient clipping (``optim.clip_grad_norm``).

A sharded classifier is a dense parameter of the trainer's optimizer: torch's SGD moves
*every* row of it by its momentum (and decays it) on every step, as Partial FC v2 does
(``fc.sharded_momentum=dense``). :class:`RowSparseSGD` can give chosen 2-D parameters the
weight store's rules instead: ``catchup`` (the same numbers as dense, paid for only on the
rows a step reads: each row catches up in closed form on the steps it missed, see
hfs/paramserver/catchup.py) or ``lazy`` (idle rows keep weight and momentum).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Callable, Iterable

import torch

from hfs.paramserver.catchup import RowClock, StepHistory, zero_grad_transition
from hfs.paramserver.kernels import load_kernel
from hfs.utils.errors import HfsError

if TYPE_CHECKING:
    from hfs.config import HfsConfig
    from hfs.paramserver.kernels import RowKernel

log = logging.getLogger(__name__)

#: returns the row indices a parameter's step should update (None: every row)
RowsFn = Callable[[], "torch.Tensor | None"]


class TorchRowClock:
    """The catchup rule for one torch parameter: the tick each row is current at, and the
    closed-form catch-up of rows that missed ticks (the maths of hfs/paramserver/catchup.py).

    A float32 parameter on the CPU is caught up by the weight store's own :class:`RowClock` on
    numpy views of the parameter and its momentum (its kernel: the fused numba pass, or the numpy
    fallback; ``paramserver.kernel``); elsewhere (CUDA, other dtypes) by torch ops on the
    parameter's device. The ticks are one tensor either way (on the CPU, the clock's array).
    """

    def __init__(self, num_rows: int, device: torch.device, kernel: "RowKernel | None" = None) -> None:
        self.host = RowClock(num_rows, kernel)  # the history; on the CPU also the ticks and the kernel
        on_cpu = torch.device(device).type == "cpu"
        self.row_tick = (torch.from_numpy(self.host.row_tick) if on_cpu
                         else torch.zeros(num_rows, dtype=torch.long, device=device))

    @property
    def history(self):
        return self.host.history

    @torch.no_grad()
    def catch_up(self, param: torch.Tensor, buf: torch.Tensor | None, rows: torch.Tensor | None) -> None:
        """Bring ``rows`` (None: all) of ``param`` and its momentum ``buf`` to the current tick, in place."""
        if self.history.num_ticks == 0:
            return
        if _host_kernel_fits(param, buf):
            weight, momentum = param.detach().numpy(), buf.numpy()
            if rows is None:
                self.host.catch_up_range(weight, momentum, 0, weight.shape[0])
            else:
                self.host.catch_up(weight, momentum, rows.to("cpu", torch.long).numpy())
            return
        self._catch_up_torch(param, buf, rows)

    def _catch_up_torch(self, param: torch.Tensor, buf: torch.Tensor | None, rows: torch.Tensor | None) -> None:
        now = self.history.num_ticks
        rows = torch.arange(param.shape[0], device=param.device) if rows is None else rows.to(param.device)
        stale = rows[self.row_tick[rows] < now]
        if stale.numel() == 0:
            return
        starts, which = torch.unique(self.row_tick[stale], return_inverse=True)
        coef = torch.from_numpy(self.history.suffix_products(starts.cpu().numpy()))
        coef = coef.to(device=param.device, dtype=param.dtype)[which]
        w = param.index_select(0, stale)
        b = buf.index_select(0, stale) if buf is not None else torch.zeros_like(w)
        param.index_copy_(0, stale, coef[:, 0, 0, None] * w + coef[:, 0, 1, None] * b)
        if buf is not None:
            buf.index_copy_(0, stale, coef[:, 1, 0, None] * w + coef[:, 1, 1, None] * b)
        self.row_tick[stale] = now

    def tick(self, rows: torch.Tensor, lr: float, momentum: float, weight_decay: float) -> None:
        self.history.append(zero_grad_transition(lr, momentum, weight_decay))
        self.row_tick[rows] = self.history.num_ticks

    def forget_history(self) -> None:
        """Every row is current (after :meth:`catch_up` of all rows): drop the recorded ticks."""
        self.host.history = StepHistory()
        self.row_tick.zero_()


def _host_kernel_fits(param: torch.Tensor, buf: torch.Tensor | None) -> bool:
    """The store's kernels take C-contiguous float32 host arrays, momentum included."""
    return (buf is not None and param.device.type == "cpu" and buf.device.type == "cpu"
            and param.dtype == torch.float32 and buf.dtype == torch.float32
            and param.is_contiguous() and buf.is_contiguous())


class RowSparseSGD(torch.optim.SGD):
    """``torch.optim.SGD``; parameters given to :meth:`update_rows_of` are updated on some rows only.

    For those rows the rule is torch's SGD exactly (weight decay, momentum with dampening,
    nesterov, maximize). The other rows keep their weight and momentum (lazy), or, with
    ``catch_up=True``, are moved as torch's dense SGD moves them, in closed form, when
    :meth:`catch_up` is asked for them (before a forward reads them) or they are updated:
    equal to dense SGD to float32 round-off. Momentum buffers are full-size tensors under the
    same state key as torch's, so checkpoints do not change. ``kernel`` (``paramserver.kernel``:
    auto, numba or numpy) is the row kernel of the catch-up on the CPU.
    """

    def __init__(self, params: Iterable, *, kernel: str = "auto", **kwargs) -> None:
        super().__init__(params, **kwargs)
        self._rows_fn: dict[torch.Tensor, RowsFn] = {}
        self._clocks: dict[torch.Tensor, TorchRowClock] = {}
        self._kernel_name = kernel

    def update_rows_of(self, param: torch.Tensor, rows_fn: RowsFn, *, catch_up: bool = False) -> None:
        """From now on ``param`` (2-D, in one of the groups) is updated on ``rows_fn()``'s rows each
        step; with ``catch_up`` its other rows follow dense SGD through :meth:`catch_up`."""
        if param.dim() != 2:
            raise ValueError(f"row-sparse updates need a 2-D parameter, got shape {tuple(param.shape)}")
        if not any(p is param for group in self.param_groups for p in group["params"]):
            raise ValueError("the parameter is not in this optimizer's groups")
        self._rows_fn[param] = rows_fn
        if catch_up:
            group = self._group_of(param)
            if group["dampening"] or group["nesterov"] or group["maximize"]:
                raise ValueError("catch-up needs SGD without dampening, nesterov or maximize")
            self._clocks[param] = TorchRowClock(param.shape[0], param.device, load_kernel(self._kernel_name))

    @torch.no_grad()
    def catch_up(self, param: torch.Tensor, rows: torch.Tensor | None = None) -> None:
        """Bring ``rows`` (None: every row) of ``param`` to the last step (no-op without catch-up)."""
        clock = self._clocks.get(param)
        if clock is not None:
            clock.catch_up(param, self.state[param].get("momentum_buffer"), rows)

    @torch.no_grad()
    def catch_up_all(self, param: torch.Tensor) -> None:
        """Every row current and the step history forgotten (before a checkpoint reads the rows)."""
        clock = self._clocks.get(param)
        if clock is not None:
            self.catch_up(param)
            clock.forget_history()

    @torch.no_grad()
    def step(self, closure=None):
        held = {p: p.grad for p in self._rows_fn if p.grad is not None}
        for p in held:  # torch's step skips parameters without a gradient
            p.grad = None
        try:
            loss = super().step(closure)
        finally:
            for p, grad in held.items():
                p.grad = grad
        for p in held:
            self._step_rows(p, self._rows_fn[p]())
        return loss

    def _group_of(self, param: torch.Tensor) -> dict:
        return next(g for g in self.param_groups if any(p is param for p in g["params"]))

    def _step_rows(self, param: torch.Tensor, rows: torch.Tensor | None) -> None:
        group = self._group_of(param)
        if rows is None:
            rows = torch.arange(param.shape[0], device=param.device)
        rows = rows.to(device=param.device, dtype=torch.long)
        lr, momentum, decay = group["lr"], group["momentum"], group["weight_decay"]
        clock = self._clocks.get(param)
        if clock is not None:  # this step is a step of every row: the idle ones catch up later
            self.catch_up(param, rows)
            self._sgd_rows(param, group, rows)
            clock.tick(rows, lr, momentum, decay)
        else:
            self._sgd_rows(param, group, rows)

    def _sgd_rows(self, param: torch.Tensor, group: dict, rows: torch.Tensor) -> None:
        if rows.numel() == 0:
            return
        lr, momentum, decay = group["lr"], group["momentum"], group["weight_decay"]
        step = param.grad.index_select(0, rows)
        if group["maximize"]:
            step = -step
        if decay:
            step = step.add(param.index_select(0, rows), alpha=decay)
        if momentum:
            state = self.state[param]
            buf = state.get("momentum_buffer")
            if buf is None:
                # torch starts a buffer as a copy of the first step; a zero buffer gives
                # momentum * 0 + (1 - dampening) * step, the same when dampening is 0 (the default)
                buf = state["momentum_buffer"] = torch.zeros_like(param)
                rows_buf = step.clone()
            else:
                rows_buf = buf.index_select(0, rows).mul_(momentum).add_(step, alpha=1 - group["dampening"])
            buf.index_copy_(0, rows, rows_buf)
            step = step.add(rows_buf, alpha=momentum) if group["nesterov"] else rows_buf
        param.index_add_(0, rows, step, alpha=-lr)


# --------------------------------------------------------------------------- the trainer's optimizer


def build_optimizer(cfg: "HfsConfig", groups: list[dict]) -> torch.optim.Optimizer:
    """The optimizer over the trainer's parameter groups (each group carries its ``lr_scale``).

    ``optim.name=sgd``: :class:`RowSparseSGD` (torch's SGD; a sharded classifier can take the
    weight store's row-sparse rule). ``optim.name=adamw``: torch's AdamW with decoupled weight
    decay, over the backbone and a classifier that is a torch parameter (fc.mode full or
    sharded). The classifier rows in the weight store (fc.mode=sampled) are updated by the
    store, whose rule is SGD; see :func:`store_sgd_hparams`.
    """
    o = cfg.optim
    if o.name == "sgd":
        return RowSparseSGD(groups, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay,
                            kernel=cfg.paramserver.kernel)
    if cfg.fc.mode == "sharded" and cfg.fc.sharded_momentum == "lazy":
        raise HfsError("config key 'fc.sharded_momentum' is 'lazy', the weight store's old SGD rule on active rows; "
                       "optim.name=adamw updates the sharded classifier densely: set fc.sharded_momentum=dense "
                       "(catchup, the default, means dense under AdamW)")
    if cfg.fc.mode == "sampled":
        log.warning("optim.name=adamw trains the backbone; the classifier rows in the weight store (fc.mode=sampled) "
                    "keep the store's SGD: lr = optim.lr x fc.lr_scale = %g, momentum %g (optim.momentum), "
                    "weight decay %g (optim.store_weight_decay)", o.lr * cfg.fc.lr_scale, o.momentum,
                    store_sgd_hparams(cfg, o.lr)[2])
    return torch.optim.AdamW(groups, lr=o.lr, betas=(o.adamw_beta1, o.adamw_beta2), eps=o.adamw_eps,
                             weight_decay=o.weight_decay)


def store_sgd_hparams(cfg: "HfsConfig", lr: float) -> tuple[float, float, float]:
    """(lr, momentum, weight decay) of the weight store's SGD on the classifier rows at backbone lr ``lr``.

    The store implements SGD only, whatever ``optim.name`` says; ``optim.store_weight_decay``
    exists because AdamW's decoupled decay (e.g. 0.1) would be far too strong as SGD's.
    """
    o = cfg.optim
    decay = o.weight_decay if o.store_weight_decay < 0 else o.store_weight_decay
    return lr * cfg.fc.lr_scale, o.momentum, decay


def clip_backbone_grads(params: Iterable[torch.nn.Parameter], max_norm: float, optimizer: torch.optim.Optimizer,
                        scaler: "torch.amp.GradScaler | None" = None) -> float | None:
    """Clip the backbone's gradient to total norm ``max_norm`` before the step (0: off).

    As arcface_torch: the backbone only (the classifier is not clipped). Under fp16 AMP the
    gradients are unscaled first, so the norm is the true one; ``scaler.step`` then knows
    they are unscaled and does not divide again. Returns the norm before clipping, or None.
    """
    if max_norm <= 0:
        return None
    if scaler is not None:
        scaler.unscale_(optimizer)
    return float(torch.nn.utils.clip_grad_norm_(list(params), max_norm))
