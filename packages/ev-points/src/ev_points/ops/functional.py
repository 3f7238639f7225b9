"""The public point ops: argument checks, then the backend chosen by the dispatcher."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ev_points.ops import _native, _triton
from ev_points.ops._common import (
    KNN,
    PointOpsError,
    check_lengths,
    check_pair,
    knn_gather,
    masked_gather,
)
from ev_points.ops.backends import pytorch3d_ops, resolve_backend

__all__ = ["ball_query", "knn_points", "sample_farthest_points"]


def _check_k(K: int, name: str = "K") -> int:
    if isinstance(K, bool) or not isinstance(K, int) or K < 1:
        raise PointOpsError(f"{name} must be a positive int, got {K!r}")
    return K


def knn_points(
    p1: Tensor,
    p2: Tensor,
    lengths1: Tensor | None = None,
    lengths2: Tensor | None = None,
    norm: int = 2,
    K: int = 1,
    version: int = -1,
    return_nn: bool = False,
    return_sorted: bool = True,
    *,
    backend: str | None = None,
) -> KNN:
    """K nearest neighbours in ``p2`` of every point of ``p1`` (``pytorch3d.ops.knn_points``).

    Args:
        p1: ``[N, P1, D]`` query clouds.
        p2: ``[N, P2, D]`` reference clouds.
        lengths1: ``[N]`` valid points per ``p1`` cloud (None = all ``P1``).
        lengths2: ``[N]`` valid points per ``p2`` cloud (None = all ``P2``).
        norm: 2 for squared Euclidean distances, 1 for L1; anything else raises.
        K: neighbours per query.
        version: pytorch3d's kernel choice (passed through; ignored by ``native``, ``triton``).
        return_nn: also return the neighbours' coordinates.
        return_sorted: ascending distances when ``K > 1`` (``native`` and ``triton`` always sort).
        backend: see :mod:`ev_points.ops.backends`.

    Returns:
        ``KNN(dists [N, P1, K], idx [N, P1, K] int64, knn [N, P1, K, D] or None)``. Distances are
        squared (norm 2). Where a ``p2`` cloud has fewer than K points, and on padded ``p1`` rows,
        ``idx`` and ``dists`` are 0 (``knn`` rows are 0 where ``k >= lengths2``). Ties go to the
        lower index. Gradients reach ``p1`` and ``p2`` through ``dists``; ``idx`` has none.
    """
    if norm not in (1, 2):
        raise PointOpsError(f"norm must be 1 (L1) or 2 (squared L2), got {norm!r}")
    lengths1, lengths2 = check_pair(p1, p2, lengths1, lengths2)
    K = _check_k(K)
    shape = (p1.shape[1], p2.shape[1], p1.shape[2])
    name = resolve_backend(backend, p1.device, p1.dtype, op="knn_points", shape=shape)
    if name == "pytorch3d":
        res = pytorch3d_ops().knn_points(
            p1,
            p2,
            lengths1,
            lengths2,
            norm=norm,
            K=K,
            version=version,
            return_nn=return_nn,
            return_sorted=return_sorted,
        )
        return KNN(res.dists, res.idx, res.knn)
    if name == "triton":
        idx = _triton.knn_idx(p1, p2, lengths1, lengths2, norm, K)
        dists = _native.knn_dists(p1, p2, lengths1, lengths2, idx, norm)
    else:
        dists, idx = _native.knn_points(p1, p2, lengths1, lengths2, norm, K, return_sorted)
    nn = knn_gather(p2, idx, lengths2) if return_nn else None
    return KNN(dists, idx, nn)


def ball_query(
    p1: Tensor,
    p2: Tensor,
    lengths1: Tensor | None = None,
    lengths2: Tensor | None = None,
    K: int = 500,
    radius: float = 0.2,
    return_nn: bool = True,
    skip_points_outside_cube: bool = False,
    *,
    backend: str | None = None,
) -> KNN:
    """Up to K points of ``p2`` within ``radius`` of each ``p1`` point (``pytorch3d.ops.ball_query``).

    The first K points in index order with ``dist² < radius²`` (strict) are returned, not
    necessarily the nearest, and not sorted.

    Args:
        p1: ``[N, P1, D]`` ball centres.
        p2: ``[N, P2, D]`` points searched.
        lengths1, lengths2: ``[N]`` valid points per cloud (None = all).
        K: most neighbours per centre.
        radius: ball radius.
        return_nn: also return the neighbours' coordinates.
        skip_points_outside_cube: pytorch3d's pruning switch (same results; passed through).
        backend: see :mod:`ev_points.ops.backends`.

    Returns:
        ``KNN(dists [N, P1, K], idx [N, P1, K], knn [N, P1, K, D] or None)``: squared distances;
        ``idx`` padded with -1, ``dists`` and ``knn`` with 0. Gradients flow through ``dists``
        (and ``knn``) to ``p1`` / ``p2``.
    """
    lengths1, lengths2 = check_pair(p1, p2, lengths1, lengths2)
    K = _check_k(K)
    if not radius > 0:
        raise PointOpsError(f"radius must be > 0, got {radius!r}")
    shape = (p1.shape[1], p2.shape[1], p1.shape[2])
    name = resolve_backend(backend, p1.device, p1.dtype, op="ball_query", shape=shape)
    if name == "pytorch3d":
        res = pytorch3d_ops().ball_query(
            p1,
            p2,
            lengths1,
            lengths2,
            K=K,
            radius=radius,
            return_nn=return_nn,
            skip_points_outside_cube=skip_points_outside_cube,
        )
        return KNN(res.dists, res.idx, res.knn)
    if name == "triton":
        idx = _triton.ball_idx(p1, p2, lengths1, lengths2, K, float(radius))
        dists = _native.ball_dists(p1, p2, idx)
    else:
        dists, idx = _native.ball_query(p1, p2, lengths1, lengths2, K, float(radius))
    return KNN(dists, idx, masked_gather(p2, idx) if return_nn else None)


def sample_farthest_points(
    points: Tensor,
    lengths: Tensor | None = None,
    K: int | Sequence[int] | Tensor = 50,
    random_start_point: bool = False,
    *,
    backend: str | None = None,
) -> tuple[Tensor, Tensor]:
    """Iterative farthest-point sampling (``pytorch3d.ops.sample_farthest_points``).

    Starts at index 0 (a random valid point with ``random_start_point``), then repeatedly takes
    the point with the largest squared distance to the selected set (float32; ties to the
    lowest index).

    Args:
        points: ``[N, P, D]`` clouds.
        lengths: ``[N]`` valid points per cloud (None = all ``P``).
        K: samples per cloud: an int, a list of N ints or an ``[N]`` tensor.
        random_start_point: start from a random point (``torch`` RNG) instead of index 0.
        backend: see :mod:`ev_points.ops.backends`.

    Returns:
        ``(points [N, max K, D] float32, idx [N, max K] int64)``: clouds with fewer than K valid
        points (or a smaller K) are padded with -1 indices and 0 points. The gather is
        differentiable; ``idx`` is not.
    """
    if points.ndim != 3:
        raise PointOpsError(f"points must be [N, P, D], got {tuple(points.shape)}")
    n = points.shape[0]
    lengths = check_lengths(lengths, points, "lengths")
    if isinstance(K, int) and not isinstance(K, bool):
        k_t = torch.full((n,), K, dtype=torch.int64, device=points.device)
    else:
        k_t = torch.as_tensor(K, dtype=torch.int64, device=points.device).reshape(-1)
        if k_t.shape[0] != n:
            raise PointOpsError("K and points must have the same batch dimension")
    if k_t.numel() and int(k_t.min()) < 0:
        raise PointOpsError(f"K must be >= 0, got {k_t.tolist()}")
    name = resolve_backend(
        backend, points.device, torch.float32, op="fps", shape=(n, points.shape[1])
    )
    if name == "pytorch3d":
        k_arg = K if isinstance(K, int) and not isinstance(K, bool) else k_t
        return pytorch3d_ops().sample_farthest_points(points, lengths, k_arg, random_start_point)
    if random_start_point:
        start = (lengths * torch.rand(n, device=points.device)).to(torch.int64)
    else:
        start = torch.zeros(n, dtype=torch.int64, device=points.device)
    fps = _triton.fps_idx if name == "triton" else _native.sample_farthest_points
    idx = fps(points, lengths, k_t, start)
    return masked_gather(points.to(torch.float32), idx), idx
