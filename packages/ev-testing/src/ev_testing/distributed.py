"""Run a test function in several gloo worker processes on the CPU."""

from __future__ import annotations

import importlib.util
import inspect
import os
import socket
import sys
from collections.abc import Callable
from typing import Any

import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _load_function(path: str, name: str) -> Callable[..., Any]:
    """Import ``name`` from the source file ``path`` (test modules are not importable by name
    under pytest's importlib import mode, so the worker loads the file itself)."""
    module_name = f"_ev_dist_{abs(hash(path))}"
    module = sys.modules.get(module_name)
    if module is None:
        spec = importlib.util.spec_from_file_location(module_name, path)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot load {path}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    fn: Callable[..., Any] = getattr(module, name)
    return fn


def _worker(
    rank: int, world_size: int, port: int, path: str, name: str, args: tuple[Any, ...]
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
    fn = _load_function(path, name)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        fn(rank, world_size, *args)
        # every rank finishes its collectives before any tears the group down: destroying a
        # gloo group while a peer still uses it can abort the process at exit
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_distributed(fn: Callable[..., Any], *args: Any, world_size: int = 2) -> None:
    """Call ``fn(rank, world_size, *args)`` in ``world_size`` spawned gloo processes.

    The process group is initialised with the torchrun environment variables set, so code
    under test may also call ``ev_core.distributed.init_distributed()``. ``fn`` must be a
    module-level function of a source file (workers import it from that file); ``args``
    must be picklable. An exception in any worker fails the caller.
    """
    path = inspect.getsourcefile(fn)
    if path is None or fn.__qualname__ != fn.__name__:
        raise ValueError(f"{fn!r} must be a module-level function defined in a source file")
    mp.start_processes(
        _worker,
        args=(world_size, _free_port(), path, fn.__name__, args),
        nprocs=world_size,
        join=True,
        start_method="spawn",
    )
