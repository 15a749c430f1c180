"""SampledFC with the real in-process store and the exact selector follows FullFC + torch SGD."""

import numpy as np
import pytest
import torch

from hfs.config import load_config
from hfs.fc import FullFC, SampledFC
from hfs.models.heads import ArcFaceHead
from hfs.paramserver.store import InProcessStore
from hfs.samplers import SelectionRule


@pytest.mark.parametrize("accum", [1, 2])
def test_store_sgd_matches_full_fc_over_steps(accum):
    torch.manual_seed(0)
    C, D, B, lr, mom, wd = 10, 6, 8, 0.5, 0.9, 0.01
    cfg = load_config(None, ["sampler.type=exact", f"fc.sample_num={C}", "sampler.background=false",
                             f"train.batch_size={B}"])
    head = ArcFaceHead(8.0, 0.3)
    full = FullFC(C, D, head, init_std=0.3, seed=1)
    opt = torch.optim.SGD(full.parameters(), lr=lr, momentum=mom, weight_decay=wd)
    store = InProcessStore(None)
    store.create("fc", C, D, init="zeros")
    store.set_rows("fc", np.arange(C), full.weight.detach().numpy().copy())
    sampled = SampledFC(store, head, rule=SelectionRule(cfg.fc.sample_num, seed=cfg.sampler.seed))
    for step in range(3):
        feats, labels = torch.randn(accum, B, D), torch.randint(0, C, (accum, B))
        for i in range(accum):
            (full(feats[i], labels[i]).loss / accum).backward()
        opt.step()
        opt.zero_grad()
        sampled.set_hparams(lr, mom, wd)
        for i in range(accum):
            (sampled(feats[i], labels[i], step, last_micro=i == accum - 1).loss / accum).backward()
        sampled.end_step(step)
    stored = np.concatenate([rows for _, rows in sampled.iter_chunks()])  # waits for the last push
    np.testing.assert_allclose(stored, full.weight.detach().numpy(), atol=1e-5)
    sampled.close()
    store.close()


@pytest.mark.parametrize("overlap", [True, False])
def test_the_store_index_holds_the_rows_a_step_updated(overlap):
    """The store's own index sees every row a step updated (exact: written in place), with no trainer read."""
    from hfs.samplers import IndexSpec
    from hfs.samplers.base import normalise_rows

    torch.manual_seed(0)
    C, D = 6, 4
    store = InProcessStore(None)
    store.create("fc", C, D, init="gaussian", std=0.3, seed=1)
    store.attach_index("fc", IndexSpec("exact", {"metric": "cosine", "device": "cpu"}, background=False))
    sampled = SampledFC(store, ArcFaceHead(8.0, 0.3), rule=SelectionRule(C), neighbours=2, overlap_push=overlap)
    sampled.set_hparams(0.5, 0.9, 0.01)
    before = store.get_rows("fc", np.arange(C))
    sampled(torch.randn(5, D), torch.randint(0, C, (5,)), 0).loss.backward()
    sampled.end_step(0)
    sampled.settle()
    after = store.get_rows("fc", np.arange(C))
    assert not np.allclose(after, before)
    indexed = store._indexes.get("fc").sampler.indexed_rows(np.arange(C))
    np.testing.assert_allclose(indexed, normalise_rows(after), atol=1e-6)
    assert sampled.index_stats()["builds"] == 1
    sampled.close()
    store.close()


def test_the_runs_update_rule_reaches_the_store_also_after_a_restore(tmp_path):
    """paramserver.update_rule is sent with create; a snapshot restored under another rule
    (an old run's lazy one) switches to the config's rule."""
    from hfs.fc.factories import create_matrix
    from hfs.paramserver.base import HParams

    lazy_cfg = load_config(None, ["paramserver.update_rule=lazy"])
    store = InProcessStore(tmp_path)
    create_matrix(store, lazy_cfg, 6, seed=0)
    assert store.matrices()["fc"]["update_rule"] == "lazy"
    store.set_hparams("fc", HParams(0.1, 0.9, 0.0))
    store.push_grads("fc", np.array([0]), np.ones((1, lazy_cfg.model.embedding_size), np.float32), 0)
    store.snapshot("t")
    restored = InProcessStore(tmp_path)
    restored.restore("t")
    assert restored.matrices()["fc"]["update_rule"] == "lazy"
    create_matrix(restored, load_config(), 6, seed=0)  # what the sampled factory does after a restore
    assert restored.matrices()["fc"]["update_rule"] == "catchup"
