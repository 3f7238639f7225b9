"""MoCo's queue of negative keys: a fixed-size FIFO ring buffer stored as module buffers."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ev_core.distributed import all_gather_with_grad

__all__ = ["NegativeQueue"]


class NegativeQueue(nn.Module):
    """FIFO queue of ``size`` key embeddings of dimension ``dim``.

    The queue starts empty; :meth:`negatives` returns only the rows written so far, so early
    steps never contrast against uninitialised (or random) keys. Its state (``queue``,
    ``ptr``, ``count``) lives in buffers and is saved with the module's ``state_dict``.

    Args:
        dim: embedding dimension ``D``.
        size: capacity ``K`` (MoCo v2: 65,536).
        dtype: storage dtype.
    """

    queue: Tensor
    ptr: Tensor
    count: Tensor

    def __init__(self, dim: int, size: int, *, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if dim < 1 or size < 1:
            raise ValueError(f"dim and size must be >= 1, got dim={dim}, size={size}")
        self.dim, self.size = dim, size
        self.register_buffer("queue", torch.zeros(size, dim, dtype=dtype))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))

    def __len__(self) -> int:
        """Number of valid keys (``≤ size``)."""
        return int(self.count)

    @torch.no_grad()
    def enqueue(self, keys: Tensor, *, gather_distributed: bool = False) -> None:
        """Write ``keys: [n, D]`` over the oldest entries (wrapping around the end).

        Args:
            keys: new keys (detached here). If ``n > size`` only the last ``size`` are kept.
            gather_distributed: first concatenate the keys of every DDP rank (rank order),
                so that every rank holds the same queue.
        """
        if keys.ndim != 2 or keys.shape[1] != self.dim:
            raise ValueError(f"keys must be [n, {self.dim}], got {tuple(keys.shape)}")
        keys = keys.detach()
        if gather_distributed:
            keys = all_gather_with_grad(keys)
        n = keys.shape[0]
        if n == 0:
            return
        if n > self.size:
            keys, n = keys[-self.size :], self.size
        idx = (self.ptr + torch.arange(n, device=self.queue.device)) % self.size
        self.queue[idx] = keys.to(device=self.queue.device, dtype=self.queue.dtype)
        self.ptr.copy_((self.ptr + n) % self.size)
        self.count.copy_(torch.clamp(self.count + n, max=self.size))

    def negatives(self) -> Tensor:
        """The valid keys ``[min(count, size), D]`` (a view; do not modify)."""
        n = int(self.count)
        return self.queue if n == self.size else self.queue[:n]

    def extra_repr(self) -> str:
        return f"dim={self.dim}, size={self.size}"
