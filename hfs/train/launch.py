"""Start one worker per device through torch's elastic launcher (what ``torchrun`` uses).

``hfs train-dist`` calls the launcher programmatically (``LaunchConfig`` +
``elastic_launch``) instead of re-executing a script, so every worker gets the very same
resolved config and flags. The launcher sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/
``MASTER_ADDR``/``MASTER_PORT`` for each worker (see :mod:`hfs.dist`), watches
them, and stops the rest as soon as one fails (``max_restarts=0``): a failed worker ends the
job with one line naming its rank and error, never a hung peer.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

from hfs.utils.errors import HfsError
from hfs.utils.process import free_port

log = logging.getLogger(__name__)

#: Static rendezvous uses the run id as the key prefix in the master's store, so every node
#: must use the same one.
RUN_ID = "hfs-train-dist"

#: Errors that already are one clear line for the user: no traceback, no type name.
USER_ERRORS = ("HfsError: ", "ConfigError: ")


@dataclass(frozen=True)
class LaunchPlan:
    """How many workers on how many nodes, and where they meet."""

    nproc: int
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 0
    backend: str = "gloo"
    rendezvous_timeout_s: float = 300.0

    @property
    def world_size(self) -> int:
        return self.nproc * self.nnodes


def visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def make_plan(dist_cfg: Any) -> LaunchPlan:
    """Check the ``dist`` section (after CLI overrides) and fill in its defaults.

    ``nproc`` 0 means one worker per visible GPU (1 on CPU); ``master_port`` 0 means a free
    port, which only a single node can pick on its own.
    """
    nproc = dist_cfg.nproc or max(visible_gpus(), 1)
    if dist_cfg.backend == "nccl":
        gpus = visible_gpus()
        if gpus == 0:
            raise HfsError("--backend nccl needs CUDA GPUs; none are visible (use --backend gloo on CPU)")
        if nproc > gpus:
            raise HfsError(f"--nproc {nproc} with nccl needs {nproc} GPUs per node; {gpus} visible")
    if dist_cfg.node_rank >= dist_cfg.nnodes:
        raise HfsError(f"--node-rank {dist_cfg.node_rank} must be below --nnodes {dist_cfg.nnodes}")
    port = dist_cfg.master_port
    if port == 0:
        if dist_cfg.nnodes > 1:
            raise HfsError("several nodes need an agreed --master-port (dist.master_port) on every node")
        port = free_port(dist_cfg.master_addr)
    return LaunchPlan(nproc=nproc, nnodes=dist_cfg.nnodes, node_rank=dist_cfg.node_rank,
                      master_addr=dist_cfg.master_addr, master_port=port, backend=dist_cfg.backend,
                      rendezvous_timeout_s=dist_cfg.rendezvous_timeout_s)


def _launch_config(plan: LaunchPlan):
    from torch.distributed.launcher.api import LaunchConfig

    return LaunchConfig(
        min_nodes=plan.nnodes, max_nodes=plan.nnodes, nproc_per_node=plan.nproc,
        run_id=RUN_ID, rdzv_backend="static", rdzv_endpoint=f"{plan.master_addr}:{plan.master_port}",
        rdzv_configs={"rank": plan.node_rank, "timeout": int(plan.rendezvous_timeout_s)},
        max_restarts=0, monitor_interval=0.2, start_method="spawn", shutdown_timeout=60,
    )


def _set_thread_env(plan: LaunchPlan) -> None:
    """Split the CPU cores between local workers unless the user chose (as torchrun does)."""
    if "OMP_NUM_THREADS" not in os.environ and plan.nproc > 1:
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // plan.nproc))


def failure_message(exc: Exception) -> str:
    """One line from the launcher's ChildFailedError: the first failed rank and its error."""
    failures = getattr(exc, "failures", None)
    if not failures:
        return str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
    rank, failure = exc.get_first_failure()
    message = _failure_text(failure)
    others = sorted(r for r in failures if r != rank)
    tail = f" (ranks {', '.join(map(str, others))} failed after it)" if others else ""
    return f"worker rank {rank} failed: {message}{tail}; the other workers were stopped"


def _failure_text(failure: Any) -> str:
    """What one failed worker said, without the error type's prefix; a signal or exit code otherwise."""
    message = failure.message
    if isinstance(message, dict):  # written by torch's @record: {"message": "Type: text", ...}
        message = message.get("message", "")
    message = " ".join(str(message).split())
    for prefix in USER_ERRORS:
        message = message.removeprefix(prefix)
    if failure.exitcode < 0:
        return f"killed by {failure.signal_name()}"
    if not message or message.startswith("To enable traceback"):
        return f"exited with code {failure.exitcode}"
    return message


@contextlib.contextmanager
def _quiet_launcher_logs() -> Iterator[None]:
    """The launcher logs every failure as multi-screen tracebacks from each layer; keep the
    one root-cause traceback we log ourselves unless the user asked for debug output."""
    if log.isEnabledFor(logging.DEBUG):
        yield
        return
    names = [n for n in logging.root.manager.loggerDict
             if n.startswith(("torch.distributed.elastic", "torch.distributed.launcher", "torch.multiprocessing"))]
    saved = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for n, level in saved.items():
            logging.getLogger(n).setLevel(level)


def _log_root_cause(exc: Exception) -> None:
    """Show the failed worker's own traceback once (from the error file torch's @record wrote)."""
    rank, failure = exc.get_first_failure()
    data = failure.error_file_data.get("message") if isinstance(failure.error_file_data, dict) else None
    stack = data.get("extraInfo", {}).get("py_callstack") if isinstance(data, dict) else None
    message = data.get("message", "") if isinstance(data, dict) else ""
    if stack and not message.startswith(USER_ERRORS):
        log.error("worker rank %d traceback:\n%s", rank, stack.rstrip())


def launch(plan: LaunchPlan, entrypoint: Callable[..., Any], *args: Any,
           resume_hint: str = "hfs train-dist --resume RUN_FOLDER") -> dict[int, Any]:
    """Run ``entrypoint(*args)`` in ``plan.nproc`` local workers; return {global rank: result}.

    ``entrypoint`` must be a module-level function (workers are spawned and import it). A
    failed worker raises :class:`HfsError` with :func:`failure_message`'s one line.
    """
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import elastic_launch

    _set_thread_env(plan)
    log.info("launching %d worker(s) on node %d/%d (%s, rendezvous %s:%d)", plan.nproc, plan.node_rank,
             plan.nnodes, plan.backend, plan.master_addr, plan.master_port)
    try:
        with _quiet_launcher_logs():
            return elastic_launch(_launch_config(plan), entrypoint)(*args)
    except ChildFailedError as exc:
        _log_root_cause(exc)
        raise HfsError(failure_message(exc)) from None
    except SignalException as exc:
        # The agent passed the signal on and waited (up to its shutdown timeout) for the
        # workers, which stop at the same step and checkpoint (see Trainer._agreed_stop).
        log.warning("interrupted by %s: the workers stopped at the same step and rank 0 wrote a checkpoint; "
                    "continue with `%s`", signal.Signals(exc.sigval).name, resume_hint)
        raise KeyboardInterrupt from None
    except Exception as exc:  # rendezvous errors: a node that never came, a port in use
        if type(exc).__module__.startswith("torch.distributed"):
            raise HfsError(f"distributed launch failed: {type(exc).__name__}: {' '.join(str(exc).split())}") from None
        raise


# --------------------------------------------------------------------------- hfs train-dist


def train_worker(cfg_data: dict, resume: str | None, verbose: int, datasets: Any = None,
                 hooks: Callable[[Any], Sequence[Any]] | None = None) -> Any:
    """One worker of `hfs train-dist`: join the group, run the trainer, leave the group.

    Rank 0 logs at the user's level and returns its :class:`TrainResult`; the others log
    warnings only and return None. ``datasets`` (picklable) replaces the configured data,
    for tests and programmatic use, as ``Trainer(datasets=...)`` does. ``hooks`` (a
    module-level function, e.g. ``hfs.eval.hooks.verification_hooks``) makes the trainer's
    extra hooks from the config in each worker.
    """
    from hfs.config import config_from_dict
    from hfs.dist import destroy_distributed, init_distributed
    from hfs.train.trainer import Trainer
    from hfs.utils.log import setup_logging

    cfg = config_from_dict(cfg_data)
    env = init_distributed(cfg.dist.backend, cfg.dist.timeout_s)
    setup_logging(verbose)
    if not env.is_main:
        logging.getLogger().setLevel(logging.WARNING)
    try:
        result = Trainer(cfg, resume=resume, datasets=datasets, env=env, hooks=hooks(cfg) if hooks else ()).run()
    finally:
        destroy_distributed()
    if result.interrupted:
        # Stopped by a signal, with a checkpoint written. Returning would block this process
        # until the launcher reads the return value, which a launcher shutting down on the
        # same signal never does; an error ends the worker now and says what happened.
        from hfs.train.run_dir import resume_hint

        raise HfsError(f"interrupted at step {result.steps}; checkpoint {result.checkpoint} written, "
                       f"continue with `{resume_hint(cfg, launched=True)}`")
    return result if env.is_main else None


@contextlib.contextmanager
def job_param_server(cfg: Any, plan: LaunchPlan) -> Iterator[str]:
    """A parameter server for this job, yielding its address; stopped when the job ends.

    Sampled training on several ranks needs one shared store. When ``paramserver.address``
    is empty, node 0 serves it from a thread of the launcher process (on loopback with a
    free port for one node; on ``dist.master_addr`` at ``paramserver.port`` for several,
    which needs ``paramserver.secret`` / HFS_PS_SECRET), snapshots in the same folder the
    trainer's embedded store would use, so checkpoints resume across both.
    """
    import threading

    from hfs.paramserver.launch import build_server, serve_options

    ps = cfg.paramserver
    multi = plan.nnodes > 1
    host = plan.master_addr if multi else "127.0.0.1"
    port = ps.port if multi else 0
    if plan.node_rank != 0:  # the server runs on node 0; the others only need its address
        yield f"tcp://{host}:{port}"
        return
    server = build_server(serve_options(cfg, host=host, port=port))
    thread = threading.Thread(target=server.serve_forever, name="hfs-job-param-server", daemon=True)
    thread.start()
    log.info("parameter server for this job on %s", server.endpoint)
    try:
        yield server.endpoint
    finally:
        server.stop()
        thread.join()
        server.close()


def run_train_dist(cfg: Any, resume: str | None = None, verbose: int = 0, datasets: Any = None,
                   worker: Callable[..., Any] = train_worker,
                   hooks: Callable[[Any], Sequence[Any]] | None = None) -> Any:
    """`hfs train-dist`: launch the workers (starting a parameter server when sampled mode
    needs one) and return rank 0's TrainResult (None on nodes other than 0).

    ``worker`` must call :func:`train_worker` with the arguments it is given; a wrapper is
    the place to register custom backbones, which every spawned worker must import itself.
    ``hooks`` is passed on to :func:`train_worker`.
    """
    import dataclasses

    from hfs.fc.layer import needs_shared_store

    plan = make_plan(cfg.dist)
    with contextlib.ExitStack() as stack:
        if needs_shared_store(cfg.fc.mode) and not cfg.paramserver.address and plan.world_size > 1:
            address = stack.enter_context(job_param_server(cfg, plan))
            cfg = dataclasses.replace(cfg, paramserver=dataclasses.replace(cfg.paramserver, address=address))
        from hfs.train.run_dir import resume_hint

        results = launch(plan, worker, cfg.to_dict(), resume, verbose, datasets, hooks,
                         resume_hint=resume_hint(cfg, launched=True))
    return results.get(0)
