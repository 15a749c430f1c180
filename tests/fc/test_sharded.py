import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hfs.fc.sharded import ShardedFC, dist_cross_entropy, select_shard_rows, shard_bounds, shard_sample_num
from hfs.train.distributed import DistEnv
from tests.train.distutil import run_ranks

C, D, B = 11, 8, 3  # classes, dims, samples per rank


class CosMarginHead(nn.Module):
    """Plain cosine logits with a CosFace margin on the positive; -1 = positive elsewhere."""

    def similarity(self, features, rows):
        return F.linear(F.normalize(features, dim=1), F.normalize(rows, dim=1))

    def forward(self, features, rows, local_labels):
        sim = self.similarity(features, rows)
        has = torch.nonzero(local_labels >= 0, as_tuple=True)[0]
        margin = torch.zeros_like(sim)
        margin[has, local_labels[has]] = 0.2
        return (sim - margin) * 8.0


def _problem():
    """A fixed 2-rank batch whose labels fall in both shards ([0, 5) and [5, 11))."""
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(C, D, generator=gen)
    features = torch.randn(2 * B, D, generator=gen)
    return weight, features, torch.tensor([0, 10, 4, 5, 5, 9])


def _reference(weight, features, labels, columns=None):
    """Single-process softmax over ``columns`` (all classes by default) on the whole batch."""
    weight = weight.clone().requires_grad_(True)
    features = features.clone().requires_grad_(True)
    cols = torch.arange(C) if columns is None else columns
    local = torch.searchsorted(cols, labels)
    loss = F.cross_entropy(CosMarginHead()(features, weight[cols], local), local)
    loss.backward()
    return loss.detach(), features.grad, weight.grad


def test_shard_bounds_cover_all_rows_contiguously():
    bounds = [shard_bounds(11, r, 3) for r in range(3)]
    assert bounds == [(0, 3), (3, 7), (7, 11)]
    assert shard_sample_num(6, 11, 4) == 3 and shard_sample_num(100, 11, 4) == 4


def test_select_shard_rows_keeps_positives_then_fills_randomly():
    labels = torch.tensor([12, 3, 15, 15, 40])
    index, local = select_shard_rows(labels, 10, 30, count=5, generator=torch.Generator().manual_seed(0))
    assert index.numel() == 5 and torch.equal(index, index.sort().values) and len(set(index.tolist())) == 5
    assert {2, 5} <= set(index.tolist())
    assert local[1] == -1 and local[4] == -1
    assert index[local[0]] == 2 and index[local[2]] == 5 and local[2] == local[3]
    whole, local_all = select_shard_rows(labels, 10, 30, count=20)
    assert whole is None and local_all.tolist() == [2, -1, 5, 5, -1]


def test_dist_cross_entropy_in_one_process_is_cross_entropy():
    logits = torch.randn(5, 7, requires_grad=True)
    labels = torch.tensor([0, 6, 3, 3, 1])
    loss = dist_cross_entropy(logits, labels)
    ref_logits = logits.detach().clone().requires_grad_(True)
    ref = F.cross_entropy(ref_logits, labels)
    loss.backward()
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(logits.grad, ref_logits.grad)


def _sharded_worker(env: DistEnv, sample_num: int, ddp_average: bool) -> dict:
    weight, features, labels = _problem()
    start, end = shard_bounds(C, env.rank, env.world_size)
    fc = ShardedFC(weight[start:end].clone(), C, CosMarginHead(), sample_num=sample_num, seed=1,
                   ddp_average=ddp_average)
    mine = features[env.rank * B:(env.rank + 1) * B].clone().requires_grad_(True)
    loss, correct, active = fc.loss_and_correct(mine, labels[env.rank * B:(env.rank + 1) * B], step=4)
    loss.backward()
    index, _ = select_shard_rows(labels, start, end, fc.sample_num, fc._generator(4))
    active_ids = torch.arange(start, end) if index is None else index + start
    return {"loss": loss.detach(), "feature_grad": mine.grad, "weight_grad": fc.weight.grad,
            "start": start, "end": end, "active": active_ids, "correct": int(correct)}


@pytest.mark.dist
@pytest.mark.parametrize("ddp_average", [False, True])
def test_sharded_equals_single_process_full_softmax(ddp_average):
    out = run_ranks(_sharded_worker, 2, C, ddp_average)
    weight, features, labels = _problem()
    loss, feature_grad, weight_grad = _reference(weight, features, labels)
    scale = 2.0 if ddp_average else 1.0  # DDP divides the backbone's gradient by W afterwards
    for rank, o in enumerate(out):
        torch.testing.assert_close(o["loss"], loss)
        torch.testing.assert_close(o["feature_grad"], scale * feature_grad[rank * B:(rank + 1) * B])
        torch.testing.assert_close(o["weight_grad"], weight_grad[o["start"]:o["end"]])
    sim = CosMarginHead().similarity(features, weight)
    assert sum(o["correct"] for o in out) == int((sim.argmax(1) == labels).sum())


@pytest.mark.dist
def test_sharded_sampled_equals_softmax_over_the_union_of_active_rows():
    out = run_ranks(_sharded_worker, 2, 6, False)
    weight, features, labels = _problem()
    columns = torch.cat([o["active"] for o in out])
    assert set(labels.tolist()) <= set(columns.tolist()) and len(columns) < C
    loss, feature_grad, weight_grad = _reference(weight, features, labels, columns)
    for rank, o in enumerate(out):
        torch.testing.assert_close(o["loss"], loss)
        torch.testing.assert_close(o["feature_grad"], feature_grad[rank * B:(rank + 1) * B])
        torch.testing.assert_close(o["weight_grad"], weight_grad[o["start"]:o["end"]])


def _predict_worker(env: DistEnv) -> torch.Tensor:
    weight, features, _ = _problem()
    start, end = shard_bounds(C, env.rank, env.world_size)
    fc = ShardedFC(weight[start:end].clone(), C, CosMarginHead(), sample_num=C)
    return fc.predict(features[env.rank * B:(env.rank + 1) * B], chunk_rows=2)


@pytest.mark.dist
def test_sharded_predict_scores_against_every_class():
    out = run_ranks(_predict_worker, 2)
    weight, features, _ = _problem()
    expected = CosMarginHead().similarity(features, weight).argmax(1)
    assert torch.equal(torch.cat(out), expected)
