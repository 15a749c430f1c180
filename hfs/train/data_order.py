"""A resumable data order: a seeded permutation per epoch plus a position inside it.

The order of epoch e is ``permutation(seed, e)``; a checkpoint stores (epoch, batches done),
and a resumed run continues from the same image of the same permutation. DataLoader worker
seeds come from a generator seeded the same way, so they do not consume the global RNG.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler


class _EpochOrder(Sampler[int]):
    def __init__(self, num_items: int, seed: int, epoch: int, start: int) -> None:
        self.num_items, self.seed, self.epoch, self.start = num_items, seed, epoch, start

    def __iter__(self) -> Iterator[int]:
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_items)
        return iter(order[self.start:].tolist())

    def __len__(self) -> int:
        return self.num_items - self.start


@dataclass
class DataPosition:
    """Where the stream stands: the current epoch and the batches already taken from it."""

    epoch: int = 0
    batch: int = 0


class BatchStream:
    """Endless (epoch after epoch) stream of full batches in a resumable order."""

    def __init__(self, dataset: Dataset, batch_size: int, seed: int, num_workers: int = 0,
                 position: DataPosition | None = None, pin_memory: bool = False) -> None:
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.position = position or DataPosition()
        self.batches_per_epoch = len(dataset) // batch_size  # type: ignore[arg-type]
        self._it: Iterator | None = None

    def _loader(self) -> DataLoader:
        pos = self.position
        set_epoch = getattr(self.dataset, "set_epoch", None)
        if set_epoch is not None:  # datasets that vary augmentation per epoch (seeded, so resumable)
            set_epoch(pos.epoch)
        order = _EpochOrder(len(self.dataset), self.seed, pos.epoch, pos.batch * self.batch_size)  # type: ignore[arg-type]
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + pos.epoch)
        return DataLoader(self.dataset, batch_size=self.batch_size, sampler=order, drop_last=True,
                          num_workers=self.num_workers, generator=gen, pin_memory=self.pin_memory,
                          persistent_workers=False)

    def next(self):
        """The next (images, labels) batch; rolls over to the next epoch's permutation."""
        if self.position.batch >= self.batches_per_epoch:
            self.position = DataPosition(self.position.epoch + 1, 0)
            self._it = None
        if self._it is None:
            self._it = iter(self._loader())
        batch = next(self._it)
        self.position = DataPosition(self.position.epoch, self.position.batch + 1)
        return batch

    def close(self) -> None:
        self._it = None
