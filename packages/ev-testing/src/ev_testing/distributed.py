"""Run a test function in several gloo worker processes on the CPU."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any

import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(
    rank: int, world_size: int, port: int, fn: Callable[..., Any], args: tuple[Any, ...]
) -> None:
    os.environ.update(
        {
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world_size),
        }
    )
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def run_distributed(fn: Callable[..., Any], *args: Any, world_size: int = 2) -> None:
    """Call ``fn(rank, world_size, *args)`` in ``world_size`` spawned gloo processes.

    The process group is initialised with the torchrun environment variables set, so code
    under test may also call ``ev_core.distributed.init_distributed()``. ``fn`` must be a
    module-level (picklable) function; an exception in any worker fails the caller.
    """
    mp.start_processes(
        _worker,
        args=(world_size, _free_port(), fn, args),
        nprocs=world_size,
        join=True,
        start_method="spawn",
    )
