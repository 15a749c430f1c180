import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hfs.config import load_config
from hfs.fc.sharded import (ShardedFC, ShardView, build_shard_selector, dist_cross_entropy, gather_shards,
                            init_shard_rows, select_shard_rows, shard_bounds, shard_sample_num)
from hfs.dist import DistEnv
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
    cols = torch.arange(weight.shape[0]) if columns is None else columns.sort().values
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


# Hard negatives: 40 classes, shards [0, 20) and [20, 40), three positives in each.
HARD_C, HARD_LABELS, HARD_SAMPLE_NUM = 40, torch.tensor([1, 25, 7, 33, 12, 38]), 20


def _hard_problem():
    gen = torch.Generator().manual_seed(11)
    return torch.randn(HARD_C, D, generator=gen), torch.randn(2 * B, D, generator=gen), HARD_LABELS


def _exact_cfg(sample_num: int, k: int = 0):
    return load_config(None, ["sampler.type=exact", "sampler.metric=cosine", "sampler.background=false",
                              "sampler.exact_device=cpu", f"sampler.k={k}", f"fc.sample_num={sample_num}",
                              "sampler.ceiling=off"])  # the nearest rows, to check against a brute-force top-k


def _selector_case(env: DistEnv, problem, num_classes: int, sample_num: int, k: int = 0) -> dict:
    """One step of ShardedFC with an exact-sampler selector; records the active set it chose."""
    weight, features, labels = problem()
    start, end = shard_bounds(num_classes, env.rank, env.world_size)
    fc = ShardedFC(weight[start:end].clone(), num_classes, CosMarginHead(), sample_num=sample_num,
                   ddp_average=False)
    cfg = _exact_cfg(sample_num, k)
    fc.attach_selector(build_shard_selector(cfg.sampler, fc, B, seed=cfg.sampler.seed, metric=cfg.sampler_metric))
    chosen = []
    select = fc.selector.select
    fc.selector.select = lambda *args: chosen.append(select(*args)) or chosen[-1]
    mine = features[env.rank * B:(env.rank + 1) * B].clone().requires_grad_(True)
    loss, _, active = fc.loss_and_correct(mine, labels[env.rank * B:(env.rank + 1) * B], step=0)
    loss.backward()
    fc.end_step(0)
    fc.close()
    return {"loss": loss.detach(), "feature_grad": mine.grad, "weight_grad": fc.weight.grad, "start": start,
            "end": end, "active": torch.from_numpy(chosen[0][0]) + start, "local": chosen[0][1],
            "share": fc.sample_num, "rows_used": active}


def _all_cases(env: DistEnv) -> dict:
    """Every 2-rank check in one spawn (starting processes is the slow part)."""
    weight, features, _ = _problem()
    start, end = shard_bounds(C, env.rank, env.world_size)
    fc = ShardedFC(weight[start:end].clone(), C, CosMarginHead(), sample_num=C)
    return {"full": _sharded_case(env, C, False), "full_ddp": _sharded_case(env, C, True),
            "sampled": _sharded_case(env, 6, False),
            "exact_whole_shard": _selector_case(env, _problem, C, C),
            "exact_hard": _selector_case(env, _hard_problem, HARD_C, HARD_SAMPLE_NUM, k=HARD_C // 2),
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
def test_exact_selector_covering_each_shard_equals_the_full_softmax(two_ranks):
    weight, features, labels = _problem()
    loss, feature_grad, weight_grad = _reference(weight, features, labels)
    for rank, o in enumerate(r["exact_whole_shard"] for r in two_ranks):
        assert torch.equal(o["active"], torch.arange(o["start"], o["end"])) and o["rows_used"] == o["end"] - o["start"]
        torch.testing.assert_close(o["loss"], loss)
        torch.testing.assert_close(o["feature_grad"], feature_grad[rank * B:(rank + 1) * B])
        torch.testing.assert_close(o["weight_grad"], weight_grad[o["start"]:o["end"]])


def _brute_force_rounds(features, shard, positives, budget):
    """Largest r such that every query's r best rows of the shard (cosine), minus the
    positives, fit in ``budget``; and those rows for r and r + 1 (as global-free sets)."""
    order = CosMarginHead().similarity(features, shard).argsort(dim=1, descending=True)
    def negatives(r):
        return set(order[:, :r].ravel().tolist()) - positives
    r = 0
    while r < shard.shape[0] and len(negatives(r + 1)) <= budget:
        r += 1
    return r, negatives(r), negatives(r + 1)


@pytest.mark.dist
def test_exact_selector_picks_each_shards_top_scoring_negatives(two_ranks):
    """Every rank queries its own index with the whole global batch: its active set holds
    its positives and, brute-force checked, the best-scoring rows of its shard."""
    weight, features, labels = _hard_problem()
    out = [r["exact_hard"] for r in two_ranks]
    for o in out:
        start, end = o["start"], o["end"]
        ids = set((o["active"] - start).tolist())
        positives = {int(y) - start for y in labels if start <= y < end}
        assert len(ids) == o["share"] == o["rows_used"] < end - start and positives <= ids
        r, must, may = _brute_force_rounds(features, weight[start:end], positives, o["share"] - len(positives))
        assert r >= 1  # the problem is sized so that at least every query's best row is in
        assert must <= ids - positives <= may
        local = torch.from_numpy(o["local"])
        here = (labels >= start) & (labels < end)
        assert torch.equal(o["active"][local[here]], labels[here]) and bool((local[~here] == -1).all())
    loss, feature_grad, weight_grad = _reference(weight, features, labels, torch.cat([o["active"] for o in out]))
    for rank, o in enumerate(out):
        torch.testing.assert_close(o["loss"], loss)
        torch.testing.assert_close(o["feature_grad"], feature_grad[rank * B:(rank + 1) * B])
        torch.testing.assert_close(o["weight_grad"], weight_grad[o["start"]:o["end"]])


def test_shard_view_serves_the_live_shard_with_local_ids():
    fc = ShardedFC(torch.arange(12.0).reshape(6, 2), 6, CosMarginHead(), sample_num=3)
    view = ShardView(fc)
    assert view.shape("fc") == (6, 2)
    chunks = list(view.iter_chunks("fc", chunk_rows=4))
    assert [first for first, _ in chunks] == [0, 4]
    np.testing.assert_array_equal(np.concatenate([rows for _, rows in chunks]), fc.weight.detach().numpy())
    with torch.no_grad():
        fc.weight.add_(1.0)
    assert chunks[0][1][0, 0] == 0.0  # chunks are copies: a rebuild's snapshot does not move under SGD
    np.testing.assert_array_equal(view.get_rows("fc", np.array([5, 0])), [[11.0, 12.0], [1.0, 2.0]])
    with pytest.raises(KeyError, match="'other'"):
        view.shape("other")


def test_random_sampler_type_attaches_no_selector():
    fc = ShardedFC(torch.randn(6, 2), 6, CosMarginHead(), sample_num=3)
    assert build_shard_selector(load_config(None, ["sampler.type=random"]).sampler, fc, 2, seed=0, metric="cosine") is None


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


def test_the_shard_selector_applies_the_ceiling_under_the_shards_live_rows():
    """One rank, an exact index: class 1 is the feature's direction, its own class 0 is not, so class 1
    never becomes a hard negative; the selector reads the rows through its ShardView."""
    rows = torch.randn(40, 8, generator=torch.Generator().manual_seed(0))
    rows[:, 0] = 0.0
    rows = rows / rows.norm(dim=1, keepdim=True)
    rows[2:, 0] = 0.1
    rows[0] = 0.0
    rows[0, 0], rows[0, 1] = 0.6, 0.8
    rows[1] = 0.0
    rows[1, 0] = 1.0
    fc = ShardedFC(rows.clone(), 40, CosMarginHead(), sample_num=8)
    cfg = load_config(None, ["sampler.type=exact", "sampler.background=false", "sampler.ceiling=positive",
                             "fc.sample_num=8"])
    selector = build_shard_selector(cfg.sampler, fc, 1, seed=0, metric="cosine")
    feature = torch.zeros(1, 8)
    feature[0, 0] = 1.0
    chosen = selector.select(feature.numpy(), np.array([0]), 0)
    hard = chosen.active[1:][chosen.log_q[1:] == 0.0]
    assert hard.size >= 1 and 1 not in hard and chosen.stats["ceiling_dropped"] > 0
    selector.close()
