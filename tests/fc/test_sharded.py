import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hfs.fc.sharded import (ShardedFC, dist_cross_entropy, gather_shards, init_shard_rows, select_shard_rows,
                            shard_bounds, shard_sample_num)
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


def _sharded_case(env: DistEnv, sample_num: int, ddp_average: bool) -> dict:
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


def _all_cases(env: DistEnv) -> dict:
    """Every 2-rank check in one spawn (starting processes is the slow part)."""
    weight, features, _ = _problem()
    start, end = shard_bounds(C, env.rank, env.world_size)
    fc = ShardedFC(weight[start:end].clone(), C, CosMarginHead(), sample_num=C)
    return {"full": _sharded_case(env, C, False), "full_ddp": _sharded_case(env, C, True),
            "sampled": _sharded_case(env, 6, False),
            "predict": fc.predict(features[env.rank * B:(env.rank + 1) * B], chunk_rows=2),
            "gathered": gather_shards(fc.weight, C), "momentum_like": gather_shards(fc.weight[:, :2] * 2, C)}


@pytest.fixture(scope="module")
def two_ranks():
    return run_ranks(_all_cases, 2)


@pytest.mark.dist
@pytest.mark.parametrize("case, scale", [("full", 1.0), ("full_ddp", 2.0)])
def test_sharded_equals_single_process_full_softmax(two_ranks, case, scale):
    weight, features, labels = _problem()
    loss, feature_grad, weight_grad = _reference(weight, features, labels)
    for rank, o in enumerate(r[case] for r in two_ranks):
        torch.testing.assert_close(o["loss"], loss)
        # with ddp_average the features' gradient is W times larger: DDP divides it by W later
        torch.testing.assert_close(o["feature_grad"], scale * feature_grad[rank * B:(rank + 1) * B])
        torch.testing.assert_close(o["weight_grad"], weight_grad[o["start"]:o["end"]])
    sim = CosMarginHead().similarity(features, weight)
    assert sum(r[case]["correct"] for r in two_ranks) == int((sim.argmax(1) == labels).sum())


@pytest.mark.dist
def test_sharded_sampled_equals_softmax_over_the_union_of_active_rows(two_ranks):
    weight, features, labels = _problem()
    out = [r["sampled"] for r in two_ranks]
    columns = torch.cat([o["active"] for o in out])
    assert set(labels.tolist()) <= set(columns.tolist()) and len(columns) < C
    loss, feature_grad, weight_grad = _reference(weight, features, labels, columns)
    for rank, o in enumerate(out):
        torch.testing.assert_close(o["loss"], loss)
        torch.testing.assert_close(o["feature_grad"], feature_grad[rank * B:(rank + 1) * B])
        torch.testing.assert_close(o["weight_grad"], weight_grad[o["start"]:o["end"]])


@pytest.mark.dist
def test_sharded_predict_scores_against_every_class(two_ranks):
    weight, features, _ = _problem()
    expected = CosMarginHead().similarity(features, weight).argmax(1)
    assert torch.equal(torch.cat([r["predict"] for r in two_ranks]), expected)


@pytest.mark.dist
def test_gather_shards_rebuilds_the_full_matrix_on_rank_zero(two_ranks):
    weight, _, _ = _problem()
    assert torch.equal(two_ranks[0]["gathered"], weight)
    assert torch.equal(two_ranks[0]["momentum_like"], weight[:, :2] * 2)
    assert two_ranks[1]["gathered"] is None


def test_init_shard_rows_do_not_depend_on_the_world_size():
    whole = init_shard_rows(0, 23, 4, "gaussian", 0.1, seed=5, block_rows=8)
    parts = [init_shard_rows(*shard_bounds(23, r, 3), 4, "gaussian", 0.1, seed=5, block_rows=8) for r in range(3)]
    assert torch.equal(torch.cat(parts), whole)
    assert whole.std() > 0.05
