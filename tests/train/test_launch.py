import os
import time

import pytest

from hfs.config import DistConfig
from hfs.train.launch import launch, make_plan
from hfs.utils.errors import HfsError


def _ranks_worker(tag: str) -> tuple:
    from hfs.train.distributed import all_reduce_sum, destroy_distributed, init_distributed

    env = init_distributed("gloo", timeout_s=30)
    total = all_reduce_sum([env.rank])[0]
    destroy_distributed()
    return tag, env.rank, env.world_size, int(os.environ["LOCAL_RANK"]), total


def _crashing_worker() -> None:
    from hfs.train.distributed import barrier, init_distributed

    env = init_distributed("gloo", timeout_s=120)
    if env.rank == 1:
        raise RuntimeError("disk full on rank one")
    barrier()  # rank 0 would wait here for the full timeout if the launcher let it
    time.sleep(120)


def test_make_plan_defaults_and_checks():
    plan = make_plan(DistConfig())
    assert plan.nproc >= 1 and plan.master_port > 0 and plan.world_size == plan.nproc
    with pytest.raises(HfsError, match="master-port"):
        make_plan(DistConfig(nnodes=2))
    with pytest.raises(HfsError, match="node-rank"):
        make_plan(DistConfig(nnodes=2, node_rank=2, master_port=29400))


@pytest.mark.dist
def test_launch_runs_every_rank_with_the_same_arguments():
    out = launch(make_plan(DistConfig(nproc=2)), _ranks_worker, "cfg")
    assert sorted(out.values()) == [("cfg", 0, 2, 0, 1.0), ("cfg", 1, 2, 1, 1.0)]


@pytest.mark.dist
@pytest.mark.timeout(90)  # the peer stuck in a barrier must be stopped, not waited for
def test_a_crashing_worker_ends_the_job_with_one_clear_line():
    with pytest.raises(HfsError) as info:
        launch(make_plan(DistConfig(nproc=2)), _crashing_worker)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("worker rank 1 failed: RuntimeError: disk full on rank one")


def _user_error_worker() -> None:
    from hfs.train.distributed import env_from_os

    if env_from_os().rank == 0:
        raise HfsError("data.root /nowhere does not exist")


@pytest.mark.dist
@pytest.mark.timeout(90)
def test_a_user_error_in_a_worker_keeps_its_own_words():
    with pytest.raises(HfsError, match=r"^worker rank 0 failed: data.root /nowhere does not exist;"):
        launch(make_plan(DistConfig(nproc=2)), _user_error_worker)
