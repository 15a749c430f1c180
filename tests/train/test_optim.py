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


# --------------------------------------------------------------------------- optim.name, clipping, store hparams

from hfs.config import load_config  # noqa: E402
from hfs.fc.sharded import split_state_rows  # noqa: E402
from hfs.train.optim import build_optimizer, clip_backbone_grads, store_sgd_hparams  # noqa: E402
from hfs.utils.errors import HfsError  # noqa: E402


def _two_groups(seed=0):
    gen = torch.Generator().manual_seed(seed)
    backbone = torch.nn.Parameter(torch.randn(5, 3, generator=gen))
    fc = torch.nn.Parameter(torch.randn(7, 3, generator=gen))
    return backbone, fc


def test_adamw_steps_equal_torch_adamw():
    cfg = load_config(None, ["optim.name=adamw", "optim.lr=0.003", "optim.weight_decay=0.1", "optim.adamw_beta1=0.8",
                             "optim.adamw_beta2=0.95", "optim.adamw_eps=1e-6", "fc.lr_scale=2"])
    ours_b, ours_fc = _two_groups()
    ref_b, ref_fc = (torch.nn.Parameter(p.detach().clone()) for p in (ours_b, ours_fc))
    ours = build_optimizer(cfg, [{"params": [ours_b], "lr_scale": 1.0}, {"params": [ours_fc], "lr_scale": 2.0}])
    ref = torch.optim.AdamW([{"params": [ref_b], "lr": 0.003}, {"params": [ref_fc], "lr": 0.006}],
                            betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)
    for group in ours.param_groups:  # what Trainer._set_lr does each step
        group["lr"] = cfg.optim.lr * group["lr_scale"]
    for grads in zip(_grads(5, (5, 3), seed=1), _grads(5, (7, 3), seed=2)):
        for (b, fc), opt in (((ours_b, ours_fc), ours), ((ref_b, ref_fc), ref)):
            b.grad, fc.grad = grads[0].clone(), grads[1].clone()
            opt.step()
    torch.testing.assert_close(ours_b, ref_b, rtol=0, atol=0)
    torch.testing.assert_close(ours_fc, ref_fc, rtol=0, atol=0)
    assert not torch.equal(ours_b.detach(), _two_groups()[0].detach())  # it did move


def test_sgd_is_the_default_and_takes_row_sparse_updates():
    b, fc = _two_groups()
    opt = build_optimizer(load_config(), [{"params": [b], "lr_scale": 1.0}, {"params": [fc], "lr_scale": 1.0}])
    assert isinstance(opt, RowSparseSGD) and opt.defaults["momentum"] == 0.9


def test_adamw_refuses_lazy_sharded_momentum_naming_the_key():
    cfg = load_config(None, ["optim.name=adamw", "fc.mode=sharded", "fc.sharded_momentum=lazy"])
    with pytest.raises(HfsError, match="'fc.sharded_momentum'"):
        build_optimizer(cfg, [{"params": list(_two_groups()), "lr_scale": 1.0}])


def test_adamw_in_sampled_mode_says_the_store_keeps_sgd(caplog):
    cfg = load_config(None, ["optim.name=adamw", "fc.mode=sampled", "optim.lr=0.001", "fc.lr_scale=100",
                             "optim.weight_decay=0.1", "optim.store_weight_decay=5e-4"])
    with caplog.at_level("WARNING", logger="hfs.train.optim"):
        opt = build_optimizer(cfg, [{"params": [_two_groups()[0]], "lr_scale": 1.0}])
    assert isinstance(opt, torch.optim.AdamW)
    assert "keep the store's SGD" in caplog.text and "lr = optim.lr x fc.lr_scale = 0.1" in caplog.text
    assert store_sgd_hparams(cfg, 0.001) == pytest.approx((0.1, 0.9, 5e-4))
    default = load_config(None, ["optim.weight_decay=1e-4", "fc.lr_scale=2"])
    assert store_sgd_hparams(default, 0.05) == pytest.approx((0.1, 0.9, 1e-4))  # negative: optim.weight_decay


def test_clipping_caps_the_total_norm_and_zero_is_off():
    b, fc = _two_groups()
    opt = torch.optim.SGD([b, fc], lr=0.1)
    b.grad = torch.full_like(b, 3.0)
    before = b.grad.norm().item()
    assert clip_backbone_grads([b], 0.0, opt) is None and b.grad.norm().item() == pytest.approx(before)
    fc.grad = torch.full_like(fc, 3.0)
    assert clip_backbone_grads([b], 5.0, opt) == pytest.approx(before)
    assert b.grad.norm().item() == pytest.approx(5.0, rel=1e-5)
    assert torch.equal(fc.grad, torch.full_like(fc, 3.0))  # the classifier is not clipped (arcface_torch's rule)
    assert clip_backbone_grads([b], 100.0, opt) == pytest.approx(5.0, rel=1e-5)
    assert b.grad.norm().item() == pytest.approx(5.0, rel=1e-5)  # under the cap: unchanged


def test_clipping_with_a_grad_scaler_unscales_first_and_steps_once():
    """Under AMP the true gradient is clipped, and the scaler's step does not unscale again."""
    start = _two_groups()[0].detach()
    w_amp, w_ref = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    opt_amp, opt_ref = torch.optim.SGD([w_amp], lr=0.1), torch.optim.SGD([w_ref], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    (scaler.scale((w_amp * 4.0).sum())).backward()
    norm = clip_backbone_grads([w_amp], 1.0, opt_amp, scaler)
    scaler.step(opt_amp)
    scaler.update()
    (w_ref * 4.0).sum().backward()
    torch.nn.utils.clip_grad_norm_([w_ref], 1.0)
    opt_ref.step()
    assert norm == pytest.approx(4.0 * start.numel() ** 0.5, rel=1e-5)
    torch.testing.assert_close(w_amp, w_ref)


def test_split_state_rows_touches_per_row_tensors_only():
    state = {"state": {0: {"exp_avg": torch.ones(4)}, 1: {"step": torch.tensor(3.0), "exp_avg": torch.ones(6, 2),
                                                           "exp_avg_sq": torch.ones(6, 2)}},
             "param_groups": []}
    out = split_state_rows(state, 1, 6, lambda t: t[:2])
    assert out["state"][1]["exp_avg"].shape == (2, 2) and out["state"][1]["exp_avg_sq"].shape == (2, 2)
    assert out["state"][1]["step"].item() == 3.0 and out["state"][0]["exp_avg"].shape == (4,)
    assert state["state"][1]["exp_avg"].shape == (6, 2)  # the input is not changed
    assert split_state_rows({"state": {}}, 1, 6, lambda t: t) == {"state": {}}


def test_catch_up_equals_torch_dense_sgd_for_a_row_sparse_parameter(kernel):
    """fc.sharded_momentum=catchup: sparse updates plus catch-up on read equal torch's dense SGD
    (on the CPU through the weight store's row kernel, numba or numpy)."""
    gen = torch.Generator().manual_seed(3)
    start = torch.randn(12, 4, generator=gen)
    dense_w, sparse_w = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    dense = torch.optim.SGD([dense_w], **HP)
    sparse = RowSparseSGD([sparse_w], kernel=kernel, **HP)
    active = [torch.tensor([0, 3]), torch.tensor([3, 5, 7]), torch.tensor([], dtype=torch.long), torch.tensor([0, 11])]
    pending = iter(active * 5)
    sparse.update_rows_of(sparse_w, lambda: next(pending), catch_up=True)
    for step, rows in enumerate(active * 5):
        for group in dense.param_groups + sparse.param_groups:
            group["lr"] = 0.1 * (1 + step % 3)  # a changing lr
        grad = torch.zeros(12, 4)
        grad[rows] = torch.randn(len(rows), 4, generator=gen)
        dense_w.grad, sparse_w.grad = grad.clone(), grad.clone()
        dense.step()
        sparse.catch_up(sparse_w, rows)  # what the forward does before reading its rows
        sparse.step()
        torch.testing.assert_close(sparse_w[rows], dense_w[rows], rtol=1e-5, atol=1e-6)
    sparse.catch_up_all(sparse_w)
    torch.testing.assert_close(sparse_w, dense_w, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sparse.state[sparse_w]["momentum_buffer"], dense.state[dense_w]["momentum_buffer"],
                               rtol=1e-5, atol=1e-6)
    assert sparse._clocks[sparse_w].history.num_ticks == 0  # forgotten once every row is current


def test_catch_up_refuses_rules_it_cannot_express():
    w = torch.nn.Parameter(torch.zeros(3, 2))
    with pytest.raises(ValueError, match="nesterov"):
        RowSparseSGD([w], lr=0.1, momentum=0.9, nesterov=True).update_rows_of(w, lambda: None, catch_up=True)
