"""Run a function on W gloo ranks in spawned processes and collect what each returns."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Callable

from hfs.utils.process import free_port


def _rank_main(local_rank: int, fn: Callable, world: int, port: int, out_dir: str, args: tuple) -> None:
    import torch

    from hfs.dist import destroy_distributed, init_distributed

    torch.set_num_threads(1)
    os.environ.update(RANK=str(local_rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local_rank),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    env = init_distributed("gloo", timeout_s=60)
    try:
        result = fn(env, *args)
    finally:
        destroy_distributed()
    torch.save(result, Path(out_dir) / f"{local_rank}.pt")


def run_ranks(fn: Callable, world: int, *args: Any) -> list[Any]:
    """``fn(env, *args)`` on every rank (fn must be a module-level function); results by rank."""
    import torch
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(_rank_main, args=(fn, world, free_port(), out, args), nprocs=world,
                           start_method="spawn")
        return [torch.load(Path(out) / f"{r}.pt", weights_only=False) for r in range(world)]
