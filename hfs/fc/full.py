"""FullFC: the whole C x D classifier as one parameter, trained by the backbone's optimizer."""

from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

from hfs.fc.common import FCOutput, init_rows, loss_and_correct
from hfs.models.heads import MarginHead


class FullFC(nn.Module):
    """The baseline: every step scores every class (cost and memory grow with C)."""

    def __init__(self, num_classes: int, dim: int, head: MarginHead, *, init: str = "gaussian",
                 init_std: float = 0.01, seed: int = 0) -> None:
        super().__init__()
        self.head = head
        self.weight = nn.Parameter(init_rows(num_classes, dim, init, init_std, seed))

    @property
    def num_classes(self) -> int:
        return self.weight.shape[0]

    def forward(self, features: torch.Tensor, labels: torch.Tensor, step: int = 0, *,
                last_micro: bool = True, grad_scale: float = 1.0) -> FCOutput:
        loss, correct = loss_and_correct(self.head, features, self.weight, labels)
        return FCOutput(loss, correct, self.num_classes)

    def iter_chunks(self, chunk_rows: int = 65536) -> Iterator[tuple[int, torch.Tensor]]:
        w = self.weight.detach()
        for first in range(0, w.shape[0], chunk_rows):
            yield first, w[first:first + chunk_rows]
