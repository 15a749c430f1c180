"""SampledFC over all classes must reproduce FullFC: same loss, backbone grads and row grads."""

import numpy as np
import pytest
import torch

from hfs.fc import FullFC, SampledFC, predict_all_classes
from hfs.models.heads import ArcFaceHead, CosFaceHead, SoftmaxHead
from hfs.paramserver.base import WeightStore
from hfs.samplers.selection import Selection, SelectionRule


class RecordingStore(WeightStore):
    """Test double: holds one matrix and records the pushes instead of applying SGD."""

    def __init__(self, weight: np.ndarray) -> None:
        self.weight = weight.astype(np.float32)
        self.pushes: list[tuple[np.ndarray, np.ndarray, int]] = []
        self.hparams = None

    def create(self, name, num_rows, dim, **kw): raise AssertionError("not used")
    def shape(self, name): return self.weight.shape
    def last_applied(self, name): return max((step for _, _, step in self.pushes), default=-1)
    def get_rows(self, name, rows, step=None): return self.weight[rows].copy()
    def set_rows(self, name, rows, values): self.weight[rows] = values
    def push_grads(self, name, rows, grads, step): self.pushes.append((rows.copy(), grads.copy(), step))
    def set_hparams(self, name, hparams): self.hparams = hparams
    def iter_chunks(self, name, chunk_rows=65536):
        for first in range(0, len(self.weight), chunk_rows):
            yield first, self.weight[first:first + chunk_rows]
    def snapshot(self, tag=None): raise AssertionError("not used")
    def restore(self, tag="latest"): raise AssertionError("not used")
    def stats(self): return {}

    def select(self, name, features, labels, step, rule, k, *, with_rows=True):
        """Every class, in a shuffled order (the layer must not depend on the order of the active set)."""
        order = np.random.default_rng(0).permutation(len(self.weight))
        pos = {int(c): i for i, c in enumerate(order)}
        chosen = Selection(order, np.array([pos[int(l)] for l in labels], dtype=np.int64))
        return chosen, (self.get_rows(name, order) if with_rows else None)


def _every_class(num_classes: int) -> SelectionRule:
    return SelectionRule(num_classes)


@pytest.mark.parametrize("head", [SoftmaxHead(), CosFaceHead(16.0, 0.3), ArcFaceHead(16.0, 0.4)],
                         ids=["softmax", "cosface", "arcface"])
@pytest.mark.parametrize("overlap", [True, False])
def test_sampled_all_classes_equals_full(head, overlap):
    torch.manual_seed(0)
    C, D, B = 13, 8, 6
    backbone = torch.nn.Linear(5, D)
    x, labels = torch.randn(B, 5), torch.randint(0, C, (B,))
    full = FullFC(C, D, head, init_std=0.5, seed=3)

    out_full = full(backbone(x), labels)
    out_full.loss.backward()
    backbone_grad_full = backbone.weight.grad.clone()
    backbone.zero_grad()

    store = RecordingStore(full.weight.detach().numpy())
    sampled = SampledFC(store, head, rule=_every_class(C), overlap_push=overlap)
    out = sampled(backbone(x), labels, step=7)
    out.loss.backward()
    sampled.end_step(7)
    sampled.settle()

    assert out.loss.item() == pytest.approx(out_full.loss.item(), rel=1e-6)
    assert out.correct.item() == out_full.correct.item()
    assert torch.allclose(backbone.weight.grad, backbone_grad_full, atol=1e-6)
    (rows, grads, step), = store.pushes
    assert step == 7
    pushed = np.zeros((C, D), np.float32)
    np.add.at(pushed, rows, grads)
    np.testing.assert_allclose(pushed, full.weight.grad.numpy(), atol=1e-6)
    sampled.close()


def test_accumulation_pushes_once_per_cycle_with_summed_grads():
    torch.manual_seed(1)
    C, D = 9, 4
    head = CosFaceHead(8.0, 0.2)
    weight = torch.randn(C, D)
    store = RecordingStore(weight.numpy())
    sampled = SampledFC(store, head, rule=_every_class(C))
    feats, labels = torch.randn(8, D), torch.randint(0, C, (8,))
    for i, last in ((0, False), (1, True)):
        out = sampled(feats[i * 4:(i + 1) * 4], labels[i * 4:(i + 1) * 4], step=0, last_micro=last)
        (out.loss / 2).backward()
    sampled.wait()
    assert len(store.pushes) == 1
    rows, grads, _ = store.pushes[0]
    pushed = np.zeros((C, D), np.float32)
    np.add.at(pushed, rows, grads)

    w = weight.clone().requires_grad_(True)
    torch.nn.functional.cross_entropy(head(feats, w, labels), labels).backward()
    np.testing.assert_allclose(pushed, w.grad.numpy(), atol=1e-6)
    sampled.close()


def test_grad_scale_is_undone_and_overflow_pushes_nothing():
    C, D = 5, 3
    store = RecordingStore(np.eye(C, D, dtype=np.float32))
    sampled = SampledFC(store, SoftmaxHead(), rule=_every_class(C), overlap_push=False)
    feats = torch.randn(2, D)
    labels = torch.tensor([0, 1])
    (sampled(feats, labels, 0, grad_scale=4.0).loss * 4.0).backward()
    (sampled(feats * float("inf"), labels, 1, grad_scale=4.0).loss * 4.0).backward()
    w = torch.tensor(np.eye(C, D, dtype=np.float32), requires_grad=True)
    torch.nn.functional.cross_entropy(feats @ w.T, labels).backward()
    rows, grads, _ = store.pushes[0]
    pushed = np.zeros((C, D), np.float32)
    np.add.at(pushed, rows, grads)
    np.testing.assert_allclose(pushed, w.grad.numpy(), atol=1e-6)
    assert store.pushes[1][0].size == 0 and store.pushes[1][2] == 1


def test_predict_all_classes_chunked_matches_dense():
    torch.manual_seed(2)
    head = ArcFaceHead()
    feats, weight = torch.randn(10, 6), torch.randn(37, 6)
    chunks = [(i, weight[i:i + 5]) for i in range(0, 37, 5)]
    dense = head.similarity(feats, weight).argmax(1)
    assert torch.equal(predict_all_classes(head, feats, chunks), dense)
    # Features in blocks too (3 x 5 scores at a time): the same answer with bounded memory.
    assert torch.equal(predict_all_classes(head, feats, chunks, max_scores=15), dense)


def test_next_steps_lr_never_reaches_a_push_in_flight():
    import time

    class SlowStore(RecordingStore):
        def push_grads(self, name, rows, grads, step):
            time.sleep(0.05)  # still in flight when the trainer sets the next step's lr
            self.pushes.append((self.hparams.lr, step))

    C, D = 4, 3
    store = SlowStore(np.eye(C, D, dtype=np.float32))
    sampled = SampledFC(store, SoftmaxHead(), rule=_every_class(C))
    feats, labels = torch.randn(2, D), torch.tensor([0, 1])
    for step, lr in enumerate((0.1, 0.2, 0.3)):
        sampled.set_hparams(lr, 0.9, 0.0)
        sampled(feats, labels, step).loss.backward()
        sampled.end_step(step)
    sampled.close()
    assert store.pushes == [(0.1, 0), (0.2, 1), (0.3, 2)]
