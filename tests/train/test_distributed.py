import pytest
import torch

from hfs.dist import (DistEnv, all_gather_no_grad, all_gather_with_grad, all_reduce_sum,
                                   broadcast_object, env_from_os, eval_indices, scale_grad)
from tests.train.distutil import run_ranks


def test_env_from_os_defaults_to_a_job_of_one(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    env = env_from_os("gloo")
    assert (env.rank, env.world_size, env.local_rank, env.is_main, env.distributed) == (0, 1, 0, True, False)
    assert env.device() == torch.device("cpu")


def test_env_from_os_reads_the_launcher_vars(monkeypatch):
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    env = env_from_os("nccl")
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (5, 8, 1, 4)
    assert not env.is_main
    assert env.device() == torch.device("cuda", 1)


def test_eval_indices_cover_every_item_once_with_equal_lengths():
    splits = [eval_indices(10, DistEnv(rank=r, world_size=3)) for r in range(3)]
    assert {len(items) for items, _ in splits} == {4}
    assert sorted(i for items, valid in splits for i in items[:valid]) == list(range(10))


def test_scale_grad_is_identity_forward_and_scales_backward():
    x = torch.randn(3, requires_grad=True)
    y = scale_grad(x, 4.0)
    assert torch.equal(y, x)
    y.sum().backward()
    assert torch.equal(x.grad, torch.full((3,), 4.0))


def _gather_worker(env: DistEnv) -> dict:
    torch.manual_seed(100 + env.rank)
    x = torch.randn(3, 4, requires_grad=True)
    weights = torch.arange(24.0).reshape(6, 4) * (env.rank + 1)  # each rank uses the gather differently
    gathered = all_gather_with_grad(x)
    (gathered * weights).sum().backward()
    labels = all_gather_no_grad(torch.tensor([env.rank, env.rank]))
    return {"x": x.detach(), "grad": x.grad, "gathered": gathered.detach(), "labels": labels,
            "sum": all_reduce_sum([env.rank, 1.0]), "obj": broadcast_object({"r": env.rank} if env.is_main else None)}


@pytest.mark.slow
@pytest.mark.dist
def test_all_gather_with_grad_sends_summed_gradients_to_their_owner():
    out = run_ranks(_gather_worker, 2)
    xs = torch.cat([o["x"] for o in out])
    base = torch.arange(24.0).reshape(6, 4)
    total = base * 1 + base * 2  # d/dx of sum_r (gathered * w_r)
    for rank, o in enumerate(out):
        assert torch.equal(o["gathered"], xs)
        assert torch.equal(o["grad"], total[rank * 3:(rank + 1) * 3])
        assert o["labels"].tolist() == [0, 0, 1, 1]
        assert o["sum"] == [1.0, 2.0]
        assert o["obj"] == {"r": 0}
