"""Distributed helpers for ``torchrun`` (DDP) training.

``init_distributed()`` reads the variables ``torchrun`` sets (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``); without them it returns a single-process
:class:`DistInfo` and every helper here degrades to the single-process behaviour.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

__all__ = [
    "DistInfo",
    "DistributedSamplerWrapper",
    "all_gather_with_grad",
    "barrier",
    "cleanup_distributed",
    "get_logger",
    "get_rank",
    "get_world_size",
    "init_distributed",
    "is_main_process",
]


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def device(self) -> torch.device:
        """``cuda:<local_rank>`` for NCCL jobs, else the CPU."""
        if self.backend == "nccl":
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")


def init_distributed(backend: str | None = None) -> DistInfo:
    """Initialise the default process group from ``torchrun`` environment variables.

    Args:
        backend: ``"nccl"``, ``"gloo"``, or ``None`` for NCCL when CUDA is available else gloo.

    Returns:
        The process's :class:`DistInfo`. Without ``WORLD_SIZE`` > 1 nothing is initialised.

    Raises:
        RuntimeError: if ``WORLD_SIZE`` > 1 but ``RANK``/``MASTER_ADDR`` are missing.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    missing = [v for v in ("RANK", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise RuntimeError(
            f"WORLD_SIZE={world_size} but {', '.join(missing)} not set: launch with torchrun"
        )
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, backend=backend)


def cleanup_distributed() -> None:
    """Destroy the default process group if one exists."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def get_rank() -> int:
    """Global rank (0 without an initialised process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    """World size (1 without an initialised process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    """True on rank 0."""
    return get_rank() == 0


def barrier() -> None:
    """``dist.barrier()`` when distributed, else nothing."""
    if get_world_size() > 1:
        dist.barrier()


class _RankFilter(logging.Filter):
    """Tags records with the rank and, on ranks other than 0, drops those below WARNING.

    The rank is read when a record is emitted, so a logger created at import time (before
    ``init_distributed``) still behaves per rank.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        rank = get_rank()
        record.rank = rank
        return rank == 0 or record.levelno >= logging.WARNING


def get_logger(name: str, level: int = logging.INFO) -> logging.Logger:
    """A logger whose records carry ``[rank N]``; ranks other than 0 only log warnings and up."""
    logger = logging.getLogger(name)
    if not any(isinstance(f, _RankFilter) for f in logger.filters):
        logger.addFilter(_RankFilter())
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s [rank %(rank)s] %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(level)
    return logger


class DistributedSamplerWrapper(Sampler[int]):
    """Shard the indices produced by any sampler across ranks.

    Each epoch the wrapped sampler is iterated in full on every rank (it must be
    deterministic given its seed and :meth:`set_epoch`), the index list is padded by
    repetition to a multiple of the world size, and rank ``r`` takes every
    ``world_size``-th index starting at ``r``. Strided sharding splits each identity's K
    consecutive indices of a P×K sampler across ranks (each rank then sees about K/W images
    per identity); samplers that must keep full P×K batches per rank should partition
    identities themselves (e.g. ``ev_reid.data.DistributedRandomIdentitySampler``).

    Args:
        sampler: the sampler to shard (e.g. a P×K identity sampler).
        num_replicas: world size (default: from the process group).
        rank: this rank (default: from the process group).
    """

    def __init__(
        self, sampler: Sampler[int], num_replicas: int | None = None, rank: int | None = None
    ) -> None:
        self.sampler = sampler
        self.num_replicas = num_replicas if num_replicas is not None else get_world_size()
        self.rank = rank if rank is not None else get_rank()
        if not 0 <= self.rank < self.num_replicas:
            raise ValueError(f"rank {self.rank} outside [0, {self.num_replicas})")
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Forward the epoch to the wrapped sampler (if it has ``set_epoch``)."""
        self.epoch = epoch
        set_epoch = getattr(self.sampler, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)

    def __iter__(self) -> Iterator[int]:
        indices = list(iter(self.sampler))
        total = math.ceil(len(indices) / self.num_replicas) * self.num_replicas
        if indices and total > len(indices):
            indices += indices[: total - len(indices)]
        return iter(indices[self.rank : total : self.num_replicas])

    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / self.num_replicas)  # type: ignore[arg-type]


class _AllGatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:
        ctx.rank = dist.get_rank()
        ctx.batch = tensor.shape[0]
        out = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(out, tensor.contiguous())
        return torch.cat(out, dim=0)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.batch : (ctx.rank + 1) * ctx.batch]


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor [B, ...]`` from every rank along dim 0, keeping gradients.

    Every rank receives the same ``[world_size·B, ...]`` tensor; in backward the gradient
    of each slice is summed over ranks (each rank's loss used every slice) and the local
    slice returned, so contrastive losses with cross-rank negatives get exact gradients.
    All ranks must pass the same batch size. Without a process group it returns ``tensor``.
    """
    if get_world_size() == 1:
        return tensor
    gathered: torch.Tensor = _AllGatherWithGrad.apply(tensor)
    return gathered
