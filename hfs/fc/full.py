"""FullFC: the whole C x D classifier as one parameter, trained by the backbone's optimizer."""

from __future__ import annotations

from typing import Any, Iterator

import torch
from torch import nn

from hfs.dist import get_world_size
from hfs.fc.common import FCOutput, init_rows, loss_and_correct, predict_all_classes
from hfs.models.heads import MarginHead


class FullFC(nn.Module):
    """The baseline: every step scores every class (cost and memory grow with C)."""

    def __init__(self, num_classes: int, dim: int, head: MarginHead, *, init: str = "gaussian",
                 init_std: float = 0.01, seed: int = 0, lr_scale: float = 1.0) -> None:
        super().__init__()
        self.head = head
        self.weight = nn.Parameter(init_rows(num_classes, dim, init, init_std, seed))
        self.lr_scale = lr_scale

    @property
    def num_classes(self) -> int:
        return self.weight.shape[0]

    @property
    def active_classes(self) -> int:
        return self.num_classes

    def forward(self, features: torch.Tensor, labels: torch.Tensor, step: int = 0, *,
                last_micro: bool = True, grad_scale: float = 1.0) -> FCOutput:
        loss, correct = loss_and_correct(self.head, features, self.weight, labels)
        return FCOutput(loss, correct, self.num_classes)

    def iter_chunks(self, chunk_rows: int = 65536) -> Iterator[tuple[int, torch.Tensor]]:
        w = self.weight.detach()
        for first in range(0, w.shape[0], chunk_rows):
            yield first, w[first:first + chunk_rows]

    # -- ClassifierLayer ---------------------------------------------------------------
    def param_groups(self) -> list[dict[str, Any]]:
        return [{"params": [self.weight], "lr_scale": self.lr_scale}]

    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        pass

    def grad_scale(self, amp_scale: float) -> float:
        return amp_scale

    def before_step(self, lr: float, momentum: float, weight_decay: float) -> None:
        pass  # the trainer's optimizer sets this parameter's lr with the backbone's

    def after_backward(self) -> None:
        """The matrix lives outside DDP: average its gradient over ranks as DDP does the backbone's."""
        world = get_world_size()
        if world > 1 and self.weight.grad is not None:
            import torch.distributed as dist

            dist.all_reduce(self.weight.grad, op=dist.ReduceOp.SUM)
            self.weight.grad.div_(world)

    def end_step(self, step: int) -> None:
        pass

    def checkpoint_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        return {"fc": self.state_dict(), "optimizer": optimizer.state_dict(), "store_snapshot": None}

    def optimizer_state(self, saved: dict[str, Any]) -> dict[str, Any]:
        return saved

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        return predict_all_classes(self.head, features, self.iter_chunks())

    def upkeep(self) -> dict[str, float]:
        return {}

    def sampler_seconds(self) -> float:
        return 0.0

    def close(self) -> None:
        pass
