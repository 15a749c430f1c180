import json

import pytest

from hfs.config import DistConfig
from hfs.train.launch import failure_message, launch, make_plan
from hfs.utils.errors import HfsError


def _crashing_worker() -> None:
    import time

    from hfs.dist import barrier, init_distributed

    env = init_distributed("gloo", timeout_s=120)
    if env.rank == 1:
        raise RuntimeError("disk full on rank one")
    barrier()  # rank 0 would wait here for the full timeout if the launcher let it
    time.sleep(120)


def test_make_plan_defaults_and_checks():
    plan = make_plan(DistConfig())
    assert plan.nproc >= 1 and plan.master_port > 0 and plan.world_size == plan.nproc
    assert make_plan(DistConfig(nproc=3, nnodes=2, node_rank=1, master_port=29400)).world_size == 6
    with pytest.raises(HfsError, match="master-port"):
        make_plan(DistConfig(nnodes=2))
    with pytest.raises(HfsError, match="node-rank"):
        make_plan(DistConfig(nnodes=2, node_rank=2, master_port=29400))


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.timeout(90)  # the peer stuck in a barrier must be stopped, not waited for
def test_a_crashing_worker_ends_the_job_with_one_clear_line():
    with pytest.raises(HfsError) as info:
        launch(make_plan(DistConfig(nproc=2)), _crashing_worker)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("worker rank 1 failed: RuntimeError: disk full on rank one")


def _child_failed(tmp_path, failures: dict):
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    out = {}
    for rank, (message, timestamp, exitcode) in failures.items():
        error_file = tmp_path / f"error-{rank}.json"
        if message is not None:
            error_file.write_text(json.dumps({"message": {"message": message, "extraInfo": {
                "py_callstack": "Traceback ...", "timestamp": str(timestamp)}}}))
        out[rank] = ProcessFailure(local_rank=rank, pid=100 + rank, exitcode=exitcode, error_file=str(error_file))
    return ChildFailedError("train_worker", out)


def test_failure_message_names_the_first_failed_rank_in_its_own_words(tmp_path):
    exc = _child_failed(tmp_path, {3: ("HfsError: data.root /nowhere does not exist", 100, 1),
                                   5: ("RuntimeError: connection reset\nby peer", 200, 1)})
    assert failure_message(exc) == ("worker rank 3 failed: data.root /nowhere does not exist "
                                    "(ranks 5 failed after it); the other workers were stopped")


def test_failure_message_for_a_killed_worker(tmp_path):
    exc = _child_failed(tmp_path, {1: (None, 0, -9)})
    assert failure_message(exc) == "worker rank 1 failed: killed by SIGKILL; the other workers were stopped"
