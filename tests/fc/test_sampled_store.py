"""SampledFC with the real in-process store and the exact selector follows FullFC + torch SGD."""

import numpy as np
import pytest
import torch

from hfs.config import load_config
from hfs.fc import FullFC, SampledFC
from hfs.models.heads import ArcFaceHead
from hfs.paramserver.store import InProcessStore
from hfs.samplers import build_selector as _build_selector


def build_selector(cfg, store, matrix, num_classes):
    """The selector sampled training builds from ``cfg`` (one rank, nothing capped)."""
    return _build_selector(cfg.sampler, store=store, matrix=matrix, num_classes=num_classes,
                           sample_num=cfg.fc.sample_num, queries_per_step=cfg.train.batch_size,
                           seed=cfg.sampler.seed, metric=cfg.sampler_metric)


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
    sampled = SampledFC(store, build_selector(cfg, store, "fc", C), head)
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


class _RecordingSelector:
    """Selects every class; records what it observes (as an index updated in place would)."""

    uses_index = True

    def __init__(self, num_classes: int) -> None:
        self.num_classes, self.seen = num_classes, []

    def select(self, queries, labels, step):
        return np.arange(self.num_classes), labels

    def observe(self, rows, values):
        self.seen.append((np.asarray(rows).copy(), np.asarray(values).copy()))

    def maybe_refresh(self, step):
        pass


@pytest.mark.parametrize("overlap", [True, False])
def test_selector_observes_rows_after_their_update(overlap):
    """The rows a step updated are observed with their updated values before the next selection."""
    torch.manual_seed(0)
    C, D = 6, 4
    store = InProcessStore(None)
    store.create("fc", C, D, init="gaussian", std=0.3, seed=1)
    selector = _RecordingSelector(C)
    sampled = SampledFC(store, selector, ArcFaceHead(8.0, 0.3), overlap_push=overlap)
    sampled.set_hparams(0.5, 0.9, 0.01)
    sampled(torch.randn(5, D), torch.randint(0, C, (5,)), 0).loss.backward()
    sampled.end_step(0)
    sampled.settle()
    rows, values = selector.seen[-1]
    np.testing.assert_array_equal(rows, np.arange(C))
    np.testing.assert_array_equal(values, store.get_rows("fc", np.arange(C)))
    assert not np.allclose(values, selector.seen[0][1])  # not the values from before the update
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
