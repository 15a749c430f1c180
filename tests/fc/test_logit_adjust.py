"""The selection rule's log-Q correction reaches the loss of both classifiers (sampler.logq)."""

import numpy as np
import torch
import torch.nn.functional as F

from hfs.fc import SampledFC
from hfs.fc.common import loss_and_correct
from hfs.fc.sharded import ShardedFC
from hfs.models.heads import CosFaceHead
from hfs.paramserver.store import InProcessStore
from hfs.samplers.selection import Selection, SelectionRule

C, D, B = 12, 6, 5
ACTIVE = np.array([1, 4, 6, 0, 9, 11], dtype=np.int64)  # positives 1, 4, 6 then negatives
LOCAL = np.array([0, 1, 2, 1, 0], dtype=np.int64)
ADJUST = np.array([0, 0, 0, 0.0, 1.5, 2.5], dtype=np.float32)


def _problem():
    gen = torch.Generator().manual_seed(2)
    return torch.randn(C, D, generator=gen), torch.randn(B, D, generator=gen)


def _expected(head, features, rows, local, adjust):
    logits, _ = head.logits_and_similarity(features, rows, local)
    return F.cross_entropy(logits + torch.as_tensor(adjust)[None, :], local)


def test_loss_and_correct_adds_the_adjustment_after_scale_and_margin():
    head = CosFaceHead(16.0, 0.3)
    weight, features = _problem()
    rows, local = weight[ACTIVE], torch.as_tensor(LOCAL)
    loss, correct = loss_and_correct(head, features, rows, local, logit_adjust=ADJUST)
    torch.testing.assert_close(loss, _expected(head, features, rows, local, ADJUST))
    plain, plain_correct = loss_and_correct(head, features, rows, local)
    torch.testing.assert_close(plain, _expected(head, features, rows, local, np.zeros(6, np.float32)))
    assert loss > plain  # negatives weighed up: a larger estimated partition sum
    assert correct == plain_correct  # the hit count stays margin- and adjustment-free


class _FixedSelector:
    """Answers one fixed Selection with an adjustment, as a rule with logq does."""

    uses_index = False

    def __init__(self, num_classes=C):
        self.num_classes = num_classes

    def select(self, queries, labels, step):
        return Selection(ACTIVE.copy(), LOCAL.copy(), ADJUST.copy())

    def observe(self, rows, values): pass
    def maybe_refresh(self, step): pass
    def close(self): pass


def test_sampled_fc_passes_the_adjustment_to_the_loss():
    head = CosFaceHead(16.0, 0.3)
    weight, features = _problem()
    store = InProcessStore(None)
    store.create("fc", C, D, init="zeros")
    store.set_rows("fc", np.arange(C), weight.numpy())
    store.select = lambda *args, **kwargs: (Selection(ACTIVE.copy(), LOCAL.copy(), ADJUST.copy()),
                                            store.get_rows("fc", ACTIVE))  # as the store answers a rule with logq
    fc = SampledFC(store, head, rule=SelectionRule(len(ACTIVE), logq=True), overlap_push=False)
    out = fc(features, torch.as_tensor(ACTIVE[LOCAL]), 0)
    torch.testing.assert_close(out.loss, _expected(head, features, weight[ACTIVE], torch.as_tensor(LOCAL), ADJUST))
    fc.close()
    store.close()


def test_sharded_fc_passes_the_adjustment_to_the_loss():
    head = CosFaceHead(16.0, 0.3)
    weight, features = _problem()
    fc = ShardedFC(weight.clone(), C, head, sample_num=len(ACTIVE), ddp_average=False)
    fc.attach_selector(_FixedSelector())
    loss, _, used = fc.loss_and_correct(features, torch.as_tensor(ACTIVE[LOCAL]), step=0)
    assert used == len(ACTIVE)
    torch.testing.assert_close(loss, _expected(head, features, weight[ACTIVE], torch.as_tensor(LOCAL), ADJUST))
    fc.close()
