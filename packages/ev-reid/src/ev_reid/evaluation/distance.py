"""Distances between re-id features, computed in fixed row blocks, and a tie-stable top-k.

Every distance in :mod:`ev_reid.evaluation` and :mod:`ev_reid.retrieval` goes through
:func:`pairwise_distance`, which multiplies the features in blocks of :data:`ROW_BLOCK` rows
aligned at absolute row indices. BLAS libraries (MKL, cuBLAS) pick kernels by matrix shape,
so ``x[:7] @ y.T`` and ``(x @ y.T)[:7]`` may differ in the last bit; computing every row inside
the same aligned block makes a chunked computation bitwise equal to the full matrix.
"""

from __future__ import annotations

from collections.abc import Iterator
from enum import Enum

import torch
import torch.nn.functional as F

__all__ = [
    "ROW_BLOCK",
    "Metric",
    "default_chunk_size",
    "iter_distance_chunks",
    "pairwise_distance",
    "prepare_features",
    "round_chunk_size",
    "topk_smallest",
]

ROW_BLOCK = 256
"""Rows per matrix-multiply block; query chunks are rounded up to a multiple of it."""


class Metric(str, Enum):  # noqa: UP042 (StrEnum needs Python 3.11; we support 3.10)
    """Distance between two feature vectors.

    ``COSINE`` is ``1 - cos(a, b)`` (fast-reid's default); ``EUCLIDEAN`` is the *squared*
    Euclidean distance ``||a - b||²`` (torchreid's ``euclidean_squared_distance``; same ranking
    as the Euclidean distance).
    """

    COSINE = "cosine"
    EUCLIDEAN = "euclidean"


def _as_metric(metric: Metric | str) -> Metric:
    try:
        return Metric(metric)
    except ValueError:
        choices = ", ".join(repr(m.value) for m in Metric)
        raise ValueError(f"unknown metric {metric!r}; expected one of {choices}") from None


def prepare_features(x: torch.Tensor, metric: Metric | str) -> torch.Tensor:
    """Validate features and bring them to the form :func:`pairwise_distance` expects.

    Args:
        x: features ``[N, D]`` (any floating dtype; half precision is upcast to float32).
        metric: cosine features are L2-normalised, Euclidean ones are returned as they are.

    Returns:
        ``[N, D]`` float32 or float64 contiguous tensor on ``x``'s device.

    Raises:
        ValueError: if ``x`` is not a 2-D floating tensor or contains NaN/inf.
    """
    m = _as_metric(metric)
    if not isinstance(x, torch.Tensor) or x.ndim != 2:
        raise ValueError(f"features must be a 2-D tensor [N, D], got {getattr(x, 'shape', x)!r}")
    if not x.is_floating_point():
        raise ValueError(f"features must be floating point, got {x.dtype}")
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()
    if x.numel() and not bool(torch.isfinite(x.amax()) & torch.isfinite(x.amin())):
        raise ValueError("features contain NaN or inf")
    if m is Metric.COSINE:
        x = F.normalize(x, p=2.0, dim=1)
    return x.contiguous()


def _block_distance(
    xb: torch.Tensor, y: torch.Tensor, y_sq: torch.Tensor | None, metric: Metric
) -> torch.Tensor:
    sim = xb @ y.T
    if metric is Metric.COSINE:
        return sim.neg_().add_(1.0).clamp_(min=0.0)
    assert y_sq is not None
    x_sq = (xb * xb).sum(1, keepdim=True)
    return sim.mul_(-2.0).add_(x_sq).add_(y_sq).clamp_(min=0.0)


def _block_rows(
    x: torch.Tensor,
    y: torch.Tensor,
    start: int,
    stop: int,
    metric: Metric,
    y_sq: torch.Tensor | None,
) -> torch.Tensor:
    """Distances of rows ``start:stop`` of ``x`` (``start`` a multiple of ``ROW_BLOCK``)."""
    if stop - start <= ROW_BLOCK:
        return _block_distance(x[start:stop].clone(), y, y_sq, metric)
    out = torch.empty((stop - start, y.shape[0]), dtype=x.dtype, device=x.device)
    for s in range(start, stop, ROW_BLOCK):
        # clone: a fresh allocation gives every block the same memory alignment
        xb = x[s : min(s + ROW_BLOCK, stop)].clone()
        out[s - start : s - start + xb.shape[0]] = _block_distance(xb, y, y_sq, metric)
    return out


def pairwise_distance(
    x: torch.Tensor, y: torch.Tensor, metric: Metric | str = Metric.COSINE
) -> torch.Tensor:
    """Full distance matrix (use for small problems; large ones use :func:`iter_distance_chunks`).

    Args:
        x: ``[N, D]`` features already passed through :func:`prepare_features`.
        y: ``[M, D]`` features, same dtype and device.
        metric: see :class:`Metric`.

    Returns:
        ``[N, M]`` distances, bitwise equal to the rows :func:`iter_distance_chunks` yields.
    """
    m = _as_metric(metric)
    _check_pair(x, y)
    y_sq = (y * y).sum(1)[None] if m is Metric.EUCLIDEAN else None
    if x.shape[0] == 0:
        return x.new_zeros((0, y.shape[0]))
    return _block_rows(x, y, 0, x.shape[0], m, y_sq)


def _check_pair(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"feature shapes {tuple(x.shape)} and {tuple(y.shape)} do not match")
    if x.dtype != y.dtype or x.device != y.device:
        raise ValueError(
            f"features differ in dtype/device: {x.dtype}/{x.device} vs {y.dtype}/{y.device}"
        )


def round_chunk_size(chunk_size: int) -> int:
    """``chunk_size`` rounded up to a multiple of :data:`ROW_BLOCK` (at least one block)."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    return -(-chunk_size // ROW_BLOCK) * ROW_BLOCK


def default_chunk_size(num_columns: int, max_entries: int = 1 << 24) -> int:
    """Rows per chunk so that a chunk holds about ``max_entries`` distances (≈64 MiB fp32)."""
    return round_chunk_size(max(1, max_entries // max(num_columns, 1)))


def iter_distance_chunks(
    x: torch.Tensor,
    y: torch.Tensor,
    metric: Metric | str = Metric.COSINE,
    chunk_size: int | None = None,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(start, dist)`` with ``dist = pairwise_distance(x, y)[start:start + c]``.

    Args:
        x: ``[N, D]`` prepared features (rows are chunked).
        y: ``[M, D]`` prepared features.
        metric: see :class:`Metric`.
        chunk_size: rows per chunk, rounded up to a multiple of :data:`ROW_BLOCK`; default
            :func:`default_chunk_size`.

    Yields:
        ``(start, [c, M] distances)``; only one chunk is alive at a time.
    """
    m = _as_metric(metric)
    _check_pair(x, y)
    c = default_chunk_size(y.shape[0]) if chunk_size is None else round_chunk_size(chunk_size)
    y_sq = (y * y).sum(1)[None] if m is Metric.EUCLIDEAN else None
    for start in range(0, x.shape[0], c):
        yield start, _block_rows(x, y, start, min(start + c, x.shape[0]), m, y_sq)


def topk_smallest(dist: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` smallest entries of each row, ordered by (distance, column index).

    ``torch.topk`` does not specify which of several equal entries it returns; this helper
    makes the choice deterministic: among equal distances the lower column index comes first
    (a stable sort of the row would give the same list).

    Args:
        dist: ``[R, N]`` distances (no NaN).
        k: number of neighbours, ``1 <= k <= N``.

    Returns:
        ``(values [R, k], indices [R, k])``.
    """
    rows, n = dist.shape
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    vals = torch.topk(dist, k, dim=1, largest=False, sorted=True).values
    thr = vals[:, -1:]
    less = dist < thr
    eq = dist == thr
    need = k - less.sum(1, keepdim=True)
    chosen = less | (eq & (eq.cumsum(1) <= need))
    idx = chosen.nonzero()[:, 1].view(rows, k)  # ascending column index within each row
    v = dist.gather(1, idx)
    v, order = torch.sort(v, dim=1, stable=True)
    return v, idx.gather(1, order)
