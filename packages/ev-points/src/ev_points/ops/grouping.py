"""Grouping and three-NN interpolation built on :func:`knn_points` (PointNet++-style layers)."""

from __future__ import annotations

import torch
from torch import Tensor

from ev_points.ops._common import PointOpsError, masked_gather
from ev_points.ops.functional import knn_points

__all__ = ["group_points", "interpolate_features", "three_interpolate", "three_nn"]


def group_points(features: Tensor, idx: Tensor) -> Tensor:
    """Gather ``features [N, P2, C]`` at neighbour indices ``idx [N, P1, K]``.

    Padding indices (-1, from :func:`ball_query`) give zero features. Differentiable.

    Returns:
        ``[N, P1, K, C]``.
    """
    if idx.ndim != 3:
        raise PointOpsError(f"idx must be [N, P1, K], got {tuple(idx.shape)}")
    return masked_gather(features, idx)


def three_nn(
    unknown: Tensor,
    known: Tensor,
    lengths_unknown: Tensor | None = None,
    lengths_known: Tensor | None = None,
    *,
    backend: str | None = None,
) -> tuple[Tensor, Tensor]:
    """The 3 nearest ``known`` points of every ``unknown`` point.

    Args:
        unknown: ``[N, P1, D]`` points to interpolate to.
        known: ``[N, P2, D]`` points carrying features (``P2 >= 1``).
        lengths_unknown, lengths_known: ``[N]`` valid points per cloud.

    Returns:
        ``(dists [N, P1, 3], idx [N, P1, 3])``: squared distances and indices, ascending,
        padded as :func:`knn_points` pads them.
    """
    res = knn_points(unknown, known, lengths_unknown, lengths_known, K=3, backend=backend)
    return res.dists, res.idx


def three_interpolate(features: Tensor, idx: Tensor, weight: Tensor) -> Tensor:
    """Weighted sum of neighbour features: ``out[n, i] = Σ_k weight[n, i, k] features[n, idx[n, i, k]]``.

    Args:
        features: ``[N, P2, C]``.
        idx: ``[N, P1, k]`` indices into ``features`` (-1 entries contribute 0).
        weight: ``[N, P1, k]``.

    Returns:
        ``[N, P1, C]``; differentiable in ``features`` and ``weight``.
    """
    if idx.shape != weight.shape:
        raise PointOpsError(f"idx {tuple(idx.shape)} and weight {tuple(weight.shape)} must match")
    return (masked_gather(features, idx) * weight[..., None]).sum(2)


def interpolate_features(
    unknown: Tensor,
    known: Tensor,
    features: Tensor,
    lengths_unknown: Tensor | None = None,
    lengths_known: Tensor | None = None,
    *,
    k: int = 3,
    eps: float = 1e-8,
    backend: str | None = None,
) -> Tensor:
    """Inverse-distance interpolation of ``features`` from ``known`` to ``unknown`` points.

    Weights are ``1 / (‖x - x_k‖ + eps)`` over the ``k`` nearest known points, normalised to
    sum to 1 (PointNet++ feature propagation); padding neighbours get weight 0.

    Args:
        unknown: ``[N, P1, D]``.
        known: ``[N, P2, D]``.
        features: ``[N, P2, C]`` features of ``known``.
        lengths_unknown, lengths_known: ``[N]`` valid points per cloud.
        k: neighbours (3 = three-NN).

    Returns:
        ``[N, P1, C]`` (0 on padded ``unknown`` rows).
    """
    res = knn_points(unknown, known, lengths_unknown, lengths_known, K=k, backend=backend)
    n = known.shape[0]
    lk = (
        lengths_known
        if lengths_known is not None
        else torch.full((n,), known.shape[1], device=known.device)
    )
    valid = torch.arange(k, device=known.device)[None, None] < lk.to(known.device)[:, None, None]
    if lengths_unknown is not None:
        rows = torch.arange(unknown.shape[1], device=known.device)[None, :, None]
        valid = valid & (rows < lengths_unknown.to(known.device)[:, None, None])
    recip = valid / (res.dists.detach().clamp_min(0).sqrt() + eps)
    weight = recip / recip.sum(-1, keepdim=True).clamp_min(eps)
    return three_interpolate(features, res.idx, weight.to(features.dtype))
