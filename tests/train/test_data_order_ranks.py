import torch
from torch.utils.data import TensorDataset

from hfs.train.data_order import BatchStream, DataPosition


def _labels(stream: BatchStream, steps: int) -> list[list[int]]:
    return [stream.next()[1].tolist() for _ in range(steps)]


def test_ranks_split_each_global_batch_of_one_process():
    data = TensorDataset(torch.zeros(26, 1), torch.arange(26))
    one = _labels(BatchStream(data, 6, seed=3), 8)  # 4 batches per epoch, so 2 epochs
    ranks = [_labels(BatchStream(data, 3, seed=3, rank=r, world_size=2), 8) for r in range(2)]
    for step in range(8):
        assert ranks[0][step] + ranks[1][step] == one[step]


def test_rank_streams_resume_from_a_global_position():
    data = TensorDataset(torch.zeros(26, 1), torch.arange(26))
    full = _labels(BatchStream(data, 3, seed=1, rank=1, world_size=2), 6)
    resumed = _labels(BatchStream(data, 3, seed=1, position=DataPosition(0, 2), rank=1, world_size=2), 4)
    assert resumed == full[2:]
