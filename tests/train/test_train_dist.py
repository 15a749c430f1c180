"""`hfs train-dist` end to end on 2 gloo ranks (tiny data, a BN-free backbone so that the
per-rank batches of DDP and one process's global batch compute the very same thing)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from hfs.config import load_config
from hfs import checkpoint as ckpt_io
from hfs.train.launch import run_train_dist, train_worker
from tests.train.conftest import make_blobs

pytestmark = [pytest.mark.dist, pytest.mark.slow]


def _linear_backbone(embedding_size: int, image_size: int, dropout: float = 0.0) -> nn.Module:
    gen = torch.Generator().manual_seed(0)
    layer = nn.Linear(3 * image_size * image_size, embedding_size)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen) * 0.05)
        layer.bias.zero_()
    return nn.Sequential(nn.Flatten(), layer)


def _worker(cfg_data: dict, resume: str | None, verbose: int, datasets, hooks=None):
    """train_worker with a BatchNorm-free test backbone registered in the spawned process."""
    from hfs.models.backbones import BACKBONES

    if "test-linear" not in BACKBONES:
        BACKBONES.register("test-linear")(_linear_backbone)
    return train_worker(cfg_data, resume, verbose, datasets, hooks)


def _cfg(out: Path, nproc: int, global_batch: int, *extra: str):
    return load_config(None, [
        "data.image_size=8", "data.num_workers=0", "model.arch=test-linear", "model.embedding_size=8",
        "head.type=cosface", "head.scale=16", "head.margin=0.1", "optim.lr=0.2", "optim.schedule=constant",
        "optim.weight_decay=0.0005", f"train.batch_size={global_batch // nproc}", "train.max_steps=8",
        "train.log_every=2", "train.checkpoint_every=4", f"train.output_dir={out}", "fc.init_std=0.1",
        f"dist.nproc={nproc}", "dist.timeout_s=60", *extra])


def _data():
    return make_blobs(num_classes=10, per_class=12, size=8), make_blobs(num_classes=10, per_class=2, size=8, seed=1), 10


def _run(cfg, resume: str | None = None):
    return run_train_dist(cfg, resume, datasets=_data(), worker=_worker)


def _final(out: Path) -> dict:
    return ckpt_io.load_checkpoint(ckpt_io.list_checkpoints(out)[-1])


def _losses(out: Path) -> list[float]:
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in lines if "loss" in r]


def _assert_same_weights(a: dict, b: dict, fc_a=None, fc_b=None) -> None:
    for key in a["backbone"]:
        torch.testing.assert_close(a["backbone"][key], b["backbone"][key], rtol=1e-4, atol=1e-5)
    fc_a = a["fc"]["weight"] if fc_a is None else fc_a
    fc_b = b["fc"]["weight"] if fc_b is None else fc_b
    torch.testing.assert_close(torch.as_tensor(fc_a), torch.as_tensor(fc_b), rtol=1e-4, atol=1e-5)


def _store_matrix(out: Path, tag: str) -> np.ndarray:
    """The classifier rows of a weight-store snapshot (either store writes the same layout)."""
    from hfs.paramserver.store import InProcessStore

    store = InProcessStore(out / "store")
    store.restore(tag)
    return np.concatenate([rows for _, rows in store.iter_chunks("fc")])


def test_two_ranks_full_softmax_equal_one_rank_with_the_same_global_batch(tmp_path):
    one = _run(_cfg(tmp_path / "one", 1, 12))
    two = _run(_cfg(tmp_path / "two", 2, 12))
    a, b = _final(tmp_path / "one"), _final(tmp_path / "two")
    assert b["world_size"] == 2 and not any(k.startswith("module.") for k in b["backbone"])
    _assert_same_weights(a, b)
    assert one.val_top1 == pytest.approx(two.val_top1)
    assert _losses(tmp_path / "two") == pytest.approx(_losses(tmp_path / "one"), rel=1e-4)


def test_sharded_mode_trains_and_resumes_on_another_world_size(tmp_path):
    """2 ranks for 8 steps == 2 ranks for 4, then 1 rank (same global batch) from that checkpoint."""
    sharded = ("fc.mode=sharded", "fc.sample_num=1000")
    _run(_cfg(tmp_path / "straight", 2, 12, *sharded))
    losses = _losses(tmp_path / "straight")
    assert losses[-1] < losses[0]
    halfway = ckpt_io.checkpoint_path(tmp_path / "straight", 4)
    saved = ckpt_io.load_checkpoint(halfway)
    assert saved["world_size"] == 2 and saved["fc"]["weight"].shape == (10, 8)
    assert saved["optimizer"]["state"][2]["momentum_buffer"].shape == (10, 8)  # whole, not one shard
    resumed = _run(_cfg(tmp_path / "resumed", 1, 12, *sharded), resume=str(halfway))
    assert (resumed.start_step, resumed.steps) == (4, 8)
    _assert_same_weights(_final(tmp_path / "straight"), _final(tmp_path / "resumed"))


def test_sampled_mode_through_the_job_server_equals_one_rank(tmp_path):
    """2 ranks pushing to the server `train-dist` starts == 1 rank with its embedded store."""
    sampled = ("fc.mode=sampled", "fc.sample_num=1000", "fc.overlap_push=true", "sampler.type=exact",
               "sampler.background=false")
    one = _run(_cfg(tmp_path / "one", 1, 12, *sampled))
    two = _run(_cfg(tmp_path / "two", 2, 12, *sampled))
    a, b = _final(tmp_path / "one"), _final(tmp_path / "two")
    assert b["store_snapshot"] == a["store_snapshot"] and int(a["store_snapshot"].split("-")[-1]) == 8
    _assert_same_weights(a, b, _store_matrix(tmp_path / "one", a["store_snapshot"]),
                         _store_matrix(tmp_path / "two", b["store_snapshot"]))
    losses = _losses(tmp_path / "two")
    assert losses[-1] < losses[0] and losses == pytest.approx(_losses(tmp_path / "one"), rel=1e-4)
    assert two.val_top1 == pytest.approx(one.val_top1)


@pytest.mark.parametrize("sampler", ["annoy", "hnsw"])
def test_sharded_mode_with_hard_negatives_from_each_ranks_index_trains(tmp_path, sampler):
    """Each rank indexes its own shard (20 of 40 classes, 8 active per step), rebuilding every
    2 steps (in the training thread, so that the rebuild count does not depend on timing);
    the loss falls and the selector's upkeep and rebuilds show in the metrics."""
    cfg = _cfg(tmp_path, 2, 12, "fc.mode=sharded", "fc.sample_num=16", f"sampler.type={sampler}",
               "sampler.refresh=interval", "sampler.interval=2", "sampler.background=false",
               "sampler.annoy_trees=4", "sampler.query_threads=1", "train.checkpoint_every=0")
    data = make_blobs(num_classes=40, per_class=6, size=8), make_blobs(num_classes=40, per_class=1, size=8, seed=1), 40
    result = run_train_dist(cfg, None, datasets=data, worker=_worker)
    assert result.steps == 8 and result.active_classes == 16
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses[-1] < losses[0]
    assert all(r["upkeep_share"] > 0 for r in records if "upkeep_share" in r)  # random negatives cost 0 here
    assert max(r.get("index_rebuilds", 0) for r in records) >= 2  # rank 0's shard index was rebuilt and swapped in


@pytest.mark.parametrize("momentum_rule", ["lazy", "dense"])
def test_sharded_lazy_momentum_moves_only_rows_that_were_active(tmp_path, momentum_rule):
    """fc.sharded_momentum=lazy: a row never active keeps its initial value (the store's rule);
    dense: torch's SGD decays and moves every row of the shard every step."""
    from hfs.fc.sharded import init_shard_rows

    cfg = _cfg(tmp_path, 2, 4, "fc.mode=sharded", "fc.sample_num=6", "sampler.type=random",
               "train.max_steps=2", "train.checkpoint_every=0", f"fc.sharded_momentum={momentum_rule}")
    data = make_blobs(num_classes=40, per_class=2, size=8), make_blobs(num_classes=40, per_class=1, size=8, seed=1), 40
    result = run_train_dist(cfg, None, datasets=data, worker=_worker)
    assert result.steps == 2
    start = init_shard_rows(0, 40, 8, cfg.fc.init, cfg.fc.init_std, cfg.train.seed)
    moved = (_final(tmp_path)["fc"]["weight"] != start).any(dim=1).sum().item()
    if momentum_rule == "lazy":
        assert 0 < moved <= 2 * 6 + 2  # at most 2 steps x (3 rows per shard x 2 shards), rounding per shard
    else:
        assert moved == 40


def test_sharded_catchup_equals_dense_sgd_on_two_ranks(tmp_path):
    """fc.sharded_momentum=catchup (6 of 40 rows active per step) ends where torch's dense SGD on
    the whole shard ends: the same classifier, momentum and backbone."""
    data = make_blobs(num_classes=40, per_class=2, size=8), make_blobs(num_classes=40, per_class=1, size=8, seed=1), 40
    finals = {}
    for rule in ("dense", "catchup"):
        cfg = _cfg(tmp_path / rule, 2, 4, "fc.mode=sharded", "fc.sample_num=6", "sampler.type=random",
                   "train.max_steps=5", "train.checkpoint_every=0", f"fc.sharded_momentum={rule}")
        run_train_dist(cfg, None, datasets=data, worker=_worker)
        finals[rule] = _final(tmp_path / rule)
    _assert_same_weights(finals["dense"], finals["catchup"])
    torch.testing.assert_close(finals["catchup"]["optimizer"]["state"][2]["momentum_buffer"],
                               finals["dense"]["optimizer"]["state"][2]["momentum_buffer"], rtol=1e-4, atol=1e-6)


def test_sharded_mode_with_adamw_resumes_on_another_world_size(tmp_path):
    """AdamW's two moments of the sharded classifier are gathered whole and cut again on resume."""
    sharded = ("fc.mode=sharded", "fc.sample_num=1000", "optim.name=adamw", "optim.lr=0.01", "optim.clip_grad_norm=5")
    _run(_cfg(tmp_path / "straight", 2, 12, *sharded))
    halfway = ckpt_io.checkpoint_path(tmp_path / "straight", 4)
    state = ckpt_io.load_checkpoint(halfway)["optimizer"]["state"][2]
    assert state["exp_avg"].shape == state["exp_avg_sq"].shape == (10, 8)  # whole, not one shard
    _run(_cfg(tmp_path / "resumed", 1, 12, *sharded), resume=str(halfway))
    _assert_same_weights(_final(tmp_path / "straight"), _final(tmp_path / "resumed"))



class _ServerIndexStats:
    """Hook: at the end of the run, each rank writes what the store reports about its index."""

    def on_start(self, trainer): pass
    def on_step_end(self, trainer, stats): return {}
    def on_record(self, trainer, record, final): pass

    def on_end(self, trainer):
        out = Path(trainer.cfg.train.output_dir) / f"index-rank{trainer.env.rank}.json"
        store = trainer.fc.store
        shards = store.server_stats() if hasattr(store, "server_stats") else [{"store": store.stats()}]
        out.write_text(json.dumps([s["store"]["indexes"]["fc"] | {"attaches": s["store"]["index_attaches"]}
                                   for s in shards]))
        return {}


def _index_stats_hooks(cfg):
    return [_ServerIndexStats()]


def test_sampled_ranks_share_the_servers_index_one_build_per_refresh(tmp_path):
    """The server `train-dist` starts keeps the index: 2 ranks send the same spec, it builds once per refresh."""
    sampled = ("fc.mode=sampled", "fc.sample_num=4", "sampler.type=exact", "sampler.background=false",
               "sampler.refresh=interval", "sampler.interval=3", "sampler.exact_device=cpu")
    run_train_dist(_cfg(tmp_path / "two", 2, 12, *sampled), datasets=_data(), worker=_worker, hooks=_index_stats_hooks)
    seen = [json.loads((tmp_path / "two" / f"index-rank{r}.json").read_text()) for r in range(2)]
    assert seen[0][0]["builds"] == seen[1][0]["builds"]  # one index, seen by both ranks
    (server,) = seen[0]
    # attached once (the second rank's equal spec is a no-op), built at the start and at steps 3 and 6 of 8
    assert server["attaches"] == 1 and server["builds"] == 3
    lines = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines() if x.strip()]
    assert [r["index_rebuilds"] for r in lines if "index_rebuilds" in r][-1] == 3  # the log line reports the server's
