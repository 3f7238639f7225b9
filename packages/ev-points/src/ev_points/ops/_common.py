"""Shared pieces of the point ops: the ``KNN`` result tuple, argument checks, padded gathers."""

from __future__ import annotations

from collections import namedtuple

import torch
from torch import Tensor

from ev_core.errors import EvError

__all__ = [
    "KNN",
    "PointOpsError",
    "check_pair",
    "error_bounds",
    "full_lengths",
    "masked_gather",
    "pair_dists",
    "sort_by_dist_then_index",
]

#: Result of :func:`~ev_points.ops.knn_points` and :func:`~ev_points.ops.ball_query`
#: (field names and order as ``pytorch3d.ops.knn._KNN``).
KNN = namedtuple("KNN", "dists idx knn")


class PointOpsError(EvError, ValueError):
    """Bad arguments to a point op (shapes, lengths, K, norm, unknown backend)."""


def full_lengths(points: Tensor) -> Tensor:
    """``[N]`` int64 lengths saying every cloud of ``points [N, P, D]`` is full."""
    return torch.full((points.shape[0],), points.shape[1], dtype=torch.int64, device=points.device)


def check_lengths(lengths: Tensor | None, points: Tensor, name: str) -> Tensor:
    """Validate ``lengths`` for ``points [N, P, D]`` (None = full) and return them as int64."""
    if lengths is None:
        return full_lengths(points)
    if not isinstance(lengths, Tensor) or lengths.shape != (points.shape[0],):
        shape = tuple(lengths.shape) if isinstance(lengths, Tensor) else type(lengths).__name__
        raise PointOpsError(f"{name} must be a tensor of shape ({points.shape[0]},), got {shape}")
    lengths = lengths.to(device=points.device, dtype=torch.int64)
    if lengths.numel() and (int(lengths.min()) < 0 or int(lengths.max()) > points.shape[1]):
        raise PointOpsError(
            f"{name} values must lie in [0, {points.shape[1]}], got {lengths.tolist()}"
        )
    return lengths


def check_pair(
    p1: Tensor, p2: Tensor, lengths1: Tensor | None, lengths2: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Check ``p1 [N, P1, D]`` / ``p2 [N, P2, D]`` and their lengths; returns int64 lengths."""
    if p1.ndim != 3 or p2.ndim != 3:
        raise PointOpsError(
            f"p1 and p2 must be [N, P, D], got {tuple(p1.shape)} and {tuple(p2.shape)}"
        )
    if p1.shape[0] != p2.shape[0]:
        raise PointOpsError("pts1 and pts2 must have the same batch dimension.")
    if p1.shape[2] != p2.shape[2]:
        raise PointOpsError("pts1 and pts2 must have the same point dimension.")
    if p1.device != p2.device:
        raise PointOpsError(f"p1 is on {p1.device} but p2 is on {p2.device}")
    return check_lengths(lengths1, p1, "lengths1"), check_lengths(lengths2, p2, "lengths2")


def pair_dists(a: Tensor, b: Tensor, norm: int) -> Tensor:
    """Distances between broadcastable point sets ``a [..., D]`` and ``b [..., D]`` (differentiable).

    Accumulated one coordinate at a time in the inputs' dtype (``0 + t_0 + t_1 + ...``) -- the
    arithmetic of pytorch3d's CPU kernels, so float32 results are bit-identical to theirs and
    neighbour decisions (ties, the radius test) agree. Squared L2 for ``norm=2``; for ``norm=1``
    the L1 sum, differentiated with sign(a - b) taken as -1 at equality, the subgradient
    pytorch3d's backward uses.
    """
    diff = a - b
    if norm == 2:
        terms = diff * diff
    else:
        terms = diff * torch.where(diff > 0, 1.0, -1.0).to(diff.dtype).detach()
    if terms.shape[-1] == 0:
        return terms.sum(-1)
    out = terms[..., 0]
    for j in range(1, terms.shape[-1]):
        out = out + terms[..., j]
    return out


def error_bounds(dtype: torch.dtype, d: int) -> tuple[float, float]:
    """``(rel, tiny)``: |computed - exact| <= rel·exact + tiny for a D-term distance computed in
    ``dtype`` by :func:`pair_dists` (or in float64 by a kd-tree): each term has relative error
    <= 3u, the sum adds (D - 1)u; ``tiny`` covers squares that underflow. Kept generous
    (2(D + 4)u)."""
    eps = torch.finfo(dtype).eps + torch.finfo(torch.float64).eps
    return 2.0 * (d + 4) * eps, max(d, 1) * torch.finfo(dtype).tiny


def sort_by_dist_then_index(d: Tensor, i: Tensor) -> tuple[Tensor, Tensor]:
    """Sort each row of ``(d, i)`` by distance, ties by the lower index (pytorch3d's k-NN order)."""
    order = torch.sort(i, dim=-1, stable=True).indices
    d, i = d.gather(-1, order), i.gather(-1, order)
    order = torch.sort(d, dim=-1, stable=True).indices
    return d.gather(-1, order), i.gather(-1, order)


def masked_gather(points: Tensor, idx: Tensor) -> Tensor:
    """Gather ``points [N, P, D]`` at ``idx [N, K]`` or ``[N, P', K]``; ``-1`` entries give 0.

    Differentiable with respect to ``points``.

    Returns:
        ``[N, K, D]`` or ``[N, P', K, D]``.
    """
    if idx.shape[0] != points.shape[0]:
        raise PointOpsError("points and idx must have the same batch dimension")
    n, _, d = points.shape
    pad = idx < 0
    safe = idx.clamp_min(0)
    flat = safe.reshape(n, -1, 1).expand(-1, -1, d)
    out = points.gather(1, flat).reshape(*idx.shape, d)
    return out.masked_fill(pad[..., None], 0.0)


def knn_gather(x: Tensor, idx: Tensor, lengths: Tensor | None = None) -> Tensor:
    """Gather features of neighbours: ``out[n, l, k] = x[n, idx[n, l, k]]``.

    As ``pytorch3d.ops.knn_gather``: entries with ``k >= lengths[n]`` are 0 (the padding of
    :func:`knn_points` when a cloud of ``x`` has fewer than K points). Differentiable in ``x``.

    Args:
        x: ``[N, M, U]`` features.
        idx: ``[N, L, K]`` int64 indices into ``x`` (from :func:`knn_points`).
        lengths: ``[N]`` valid points per cloud of ``x`` (None = all ``M``).

    Returns:
        ``[N, L, K, U]``.
    """
    if x.ndim != 3 or idx.ndim != 3:
        raise PointOpsError(
            f"x must be [N, M, U] and idx [N, L, K], got {tuple(x.shape)}, {tuple(idx.shape)}"
        )
    if x.shape[0] != idx.shape[0]:
        raise PointOpsError("x and idx must have same batch dimension.")
    lengths = check_lengths(lengths, x, "lengths")
    n, _, u = x.shape
    _, rows, k = idx.shape
    out = x.gather(1, idx.reshape(n, rows * k, 1).expand(-1, -1, u)).reshape(n, rows, k, u)
    if k and int(lengths.min()) < k:
        mask = lengths[:, None] <= torch.arange(k, device=x.device)[None]
        out = out.masked_fill(mask[:, None, :, None], 0.0)
    return out
