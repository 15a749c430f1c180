"""RowSparseSGD: torch's SGD on chosen rows, the weight store's rule for a sharded classifier."""

import numpy as np
import pytest
import torch

from hfs.paramserver.base import HParams
from hfs.paramserver.store import InProcessStore
from hfs.train.optim import RowSparseSGD

HP = dict(lr=0.1, momentum=0.9, weight_decay=5e-4)


def _grads(steps, shape, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=gen) for _ in range(steps)]


def test_every_row_selected_equals_torch_sgd():
    start = torch.randn(6, 4, generator=torch.Generator().manual_seed(1))
    dense_w, sparse_w = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    dense = torch.optim.SGD([dense_w], **HP)
    sparse = RowSparseSGD([sparse_w], **HP)
    sparse.update_rows_of(sparse_w, lambda: None)
    for grad in _grads(4, (6, 4)):
        for w, opt in ((dense_w, dense), (sparse_w, sparse)):
            w.grad = grad.clone()
            opt.step()
    torch.testing.assert_close(sparse_w, dense_w, rtol=0, atol=1e-7)
    torch.testing.assert_close(sparse.state[sparse_w]["momentum_buffer"], dense.state[dense_w]["momentum_buffer"],
                               rtol=0, atol=1e-7)


def test_inactive_rows_keep_weight_and_momentum_and_active_rows_follow_the_store():
    """Rows active in a step move as the weight store moves them; the others do not move at all."""
    start = np.random.default_rng(0).standard_normal((8, 3)).astype(np.float32)
    weight = torch.nn.Parameter(torch.from_numpy(start.copy()))
    other = torch.nn.Parameter(torch.ones(2))  # a dense parameter in the same optimizer: plain SGD
    opt = RowSparseSGD([{"params": [other]}, {"params": [weight]}], **HP)
    active_per_step = [torch.tensor([0, 3]), torch.tensor([3, 5, 7]), torch.tensor([0])]
    pending = iter(active_per_step)
    opt.update_rows_of(weight, lambda: next(pending))
    store = InProcessStore(update_rule="lazy")  # RowSparseSGD implements the store's lazy rule
    store.create("fc", 8, 3)
    store.set_rows("fc", np.arange(8), start)
    store.set_hparams("fc", HParams(**HP))
    for step, (rows, grad) in enumerate(zip(active_per_step, _grads(3, (8, 3)))):
        grad[~torch.isin(torch.arange(8), rows)] = 0  # what a sampled/sharded step produces
        before = weight.detach().clone()
        weight.grad, other.grad = grad, torch.ones(2)
        opt.step()
        store.push_grads("fc", rows.numpy(), grad[rows].numpy(), step)
        untouched = ~torch.isin(torch.arange(8), rows)
        assert torch.equal(weight.detach()[untouched], before[untouched])
        np.testing.assert_allclose(weight.detach().numpy(), store.get_rows("fc", np.arange(8)), rtol=0, atol=1e-6)
    assert torch.equal(opt.state[weight]["momentum_buffer"][[1, 2, 4, 6]], torch.zeros(4, 3))
    assert not torch.equal(other.detach(), torch.ones(2))
    store.close()


def test_only_2d_parameters_in_the_optimizer():
    w = torch.nn.Parameter(torch.zeros(3))
    opt = RowSparseSGD([w], lr=0.1)
    with pytest.raises(ValueError, match="2-D"):
        opt.update_rows_of(w, lambda: None)
    with pytest.raises(ValueError, match="not in this optimizer"):
        opt.update_rows_of(torch.nn.Parameter(torch.zeros(2, 2)), lambda: None)
