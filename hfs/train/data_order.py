"""A resumable data order: a seeded permutation per epoch plus a position inside it.

The order of epoch e is ``permutation(seed, e)``; a checkpoint stores (epoch, batches done),
and a resumed run continues from the same image of the same permutation. DataLoader worker
seeds come from a generator seeded the same way, so they do not consume the global RNG.

With W ranks (``hfs train-dist``) every rank draws the same permutation and a step's
*global* batch is the next ``batch_size * W`` items of it; rank r takes the r-th
``batch_size`` slice. So W ranks with batch B see exactly the global batches one process
with batch B*W sees, and the position (global batches done) means the same on every rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from hfs.train.interrupt import leave_stop_to_the_trainer


class _EpochOrder(Sampler[int]):
    """This rank's items of epoch ``epoch`` from global batch ``start_batch`` on."""

    def __init__(self, num_items: int, seed: int, epoch: int, start_batch: int, batch_size: int,
                 rank: int = 0, world_size: int = 1) -> None:
        self.num_items, self.seed, self.epoch = num_items, seed, epoch
        self.start_batch, self.batch_size, self.rank, self.world_size = start_batch, batch_size, rank, world_size
        self.batches = max(num_items // (batch_size * world_size) - start_batch, 0)

    def __iter__(self) -> Iterator[int]:
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_items)
        glob = self.batch_size * self.world_size
        rest = order[self.start_batch * glob:(self.start_batch + self.batches) * glob]
        mine = rest.reshape(self.batches, self.world_size, self.batch_size)[:, self.rank]
        return iter(mine.reshape(-1).tolist())

    def __len__(self) -> int:
        return self.batches * self.batch_size


@dataclass
class DataPosition:
    """Where the stream stands: the current epoch and the batches already taken from it."""

    epoch: int = 0
    batch: int = 0


class BatchStream:
    """Endless (epoch after epoch) stream of full batches in a resumable order.

    ``batch_size`` is this rank's share; ``batches_per_epoch`` counts global batches.
    """

    def __init__(self, dataset: Dataset, batch_size: int, seed: int, num_workers: int = 0,
                 position: DataPosition | None = None, pin_memory: bool = False, *,
                 rank: int = 0, world_size: int = 1) -> None:
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.rank, self.world_size = rank, world_size
        self.position = position or DataPosition()
        self.batches_per_epoch = len(dataset) // (batch_size * world_size)  # type: ignore[arg-type]
        self._it: Iterator | None = None

    def _loader(self) -> DataLoader:
        pos = self.position
        set_epoch = getattr(self.dataset, "set_epoch", None)
        if set_epoch is not None:  # datasets that vary augmentation per epoch (seeded, so resumable)
            set_epoch(pos.epoch)
        order = _EpochOrder(len(self.dataset), self.seed, pos.epoch, pos.batch, self.batch_size,  # type: ignore[arg-type]
                            self.rank, self.world_size)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + pos.epoch)
        return DataLoader(self.dataset, batch_size=self.batch_size, sampler=order, drop_last=True,
                          num_workers=self.num_workers, generator=gen, pin_memory=self.pin_memory,
                          persistent_workers=False, worker_init_fn=leave_stop_to_the_trainer)

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
