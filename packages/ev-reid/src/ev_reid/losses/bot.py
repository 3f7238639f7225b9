"""Re-id training losses: label-smoothed identity cross entropy and batch-hard triplet.

Both follow the BoT recipe (Luo et al., "Bag of Tricks and a Strong Baseline for Deep Person
Re-identification"): the identity loss uses smoothed targets ``(1 − ε)·onehot + ε/K`` with
``ε = 0.1``; the triplet loss takes, for every anchor of a P×K batch, its farthest positive and
its closest negative, with a hinge of margin 0.3 (or the soft margin ``log(1 + exp(d_ap − d_an))``).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "CrossEntropyLabelSmooth",
    "TripletLoss",
    "batch_hard_triplet_loss",
    "label_smoothed_cross_entropy",
    "triplet_distance",
]

DistanceMetric = Literal["euclidean", "cosine"]


def label_smoothed_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, epsilon: float = 0.1
) -> torch.Tensor:
    """Cross entropy against ``(1 − ε)·onehot(y) + ε/K``, averaged over the batch.

    Args:
        logits: ``[B, K]``.
        targets: class indices ``[B]`` in ``[0, K)``.
        epsilon: smoothing ε in ``[0, 1)``.

    Returns:
        Scalar loss.
    """
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(
            f"expected logits [B, K] and targets [B], got {tuple(logits.shape)} and "
            f"{tuple(targets.shape)}"
        )
    if not 0.0 <= epsilon < 1.0:
        raise ValueError(f"epsilon must be in [0, 1), got {epsilon}")
    num_classes = logits.shape[1]
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= num_classes):
        raise ValueError(f"targets must lie in [0, {num_classes}), got {targets.tolist()}")
    log_probs = F.log_softmax(logits, dim=1)
    nll = -log_probs.gather(1, targets.unsqueeze(1)).squeeze(1)
    uniform = -log_probs.mean(dim=1)
    return ((1.0 - epsilon) * nll + epsilon * uniform).mean()


class CrossEntropyLabelSmooth(nn.Module):
    """Module form of :func:`label_smoothed_cross_entropy`.

    Args:
        epsilon: smoothing ε (BoT: 0.1).
    """

    def __init__(self, epsilon: float = 0.1) -> None:
        super().__init__()
        if not 0.0 <= epsilon < 1.0:
            raise ValueError(f"epsilon must be in [0, 1), got {epsilon}")
        self.epsilon = epsilon

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """``logits [B, K]``, ``targets [B]`` → scalar."""
        return label_smoothed_cross_entropy(logits, targets, self.epsilon)

    def extra_repr(self) -> str:
        return f"epsilon={self.epsilon}"


def triplet_distance(x: torch.Tensor, metric: DistanceMetric = "euclidean") -> torch.Tensor:
    """All-pairs distances of the rows of ``x`` as the triplet loss uses them (differentiable).

    Unlike the evaluation distances (:func:`ev_reid.evaluation.pairwise_distance`, squared L2
    or ``1 − cos`` between two sets), the triplet loss works on the L2 distance itself, as BoT.

    Args:
        x: ``[B, D]``.
        metric: ``"euclidean"`` (``‖a − b‖₂``, not squared; the square is clamped at 1e-12
            before the root so the gradient stays finite on the diagonal) or ``"cosine"``
            (``1 − cos(a, b)``).

    Returns:
        ``[B, B]``.
    """
    if metric == "euclidean":
        sq = x.pow(2).sum(dim=1)
        d2 = sq.unsqueeze(1) + sq.unsqueeze(0) - 2.0 * (x @ x.t())
        return d2.clamp(min=1e-12).sqrt()
    if metric == "cosine":
        xn = F.normalize(x, dim=1)
        return 1.0 - xn @ xn.t()
    raise ValueError(f"unknown distance metric {metric!r}: expected 'euclidean' or 'cosine'")


def batch_hard_triplet_loss(
    features: torch.Tensor,
    labels: torch.Tensor,
    *,
    margin: float = 0.3,
    metric: DistanceMetric = "euclidean",
    soft_margin: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batch-hard triplet loss.

    For anchor ``i``: ``d_ap = max_{j ≠ i, y_j = y_i} d(i, j)``, ``d_an = min_{y_j ≠ y_i} d(i, j)``,
    loss ``max(0, d_ap − d_an + margin)`` or, with ``soft_margin``, ``softplus(d_ap − d_an)``.
    Anchors without another sample of their identity or without any negative in the batch
    have no triplet and are left out of the mean; a batch with no triplet at all gives a zero
    loss that still backpropagates (zeros).

    Args:
        features: ``[B, D]``.
        labels: identities ``[B]``.
        margin: hinge margin (ignored with ``soft_margin``).
        metric: ``"euclidean"`` or ``"cosine"`` distance.
        soft_margin: use the soft margin instead of the hinge.

    Returns:
        ``(loss, d_ap, d_an)``: the scalar loss and the per-anchor hardest distances ``[B]``
        (``nan`` for anchors without a triplet), useful for logging.
    """
    if features.dim() != 2 or labels.shape != features.shape[:1]:
        raise ValueError(
            f"expected features [B, D] and labels [B], got {tuple(features.shape)} and "
            f"{tuple(labels.shape)}"
        )
    dist = triplet_distance(features, metric)
    same = labels.unsqueeze(0) == labels.unsqueeze(1)
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    pos_mask = same & ~eye
    neg_mask = ~same
    valid = pos_mask.any(dim=1) & neg_mask.any(dim=1)
    d_ap = dist.masked_fill(~pos_mask, float("-inf")).amax(dim=1)
    d_an = dist.masked_fill(~neg_mask, float("inf")).amin(dim=1)
    nan = torch.full_like(d_ap, float("nan"))
    stats_ap = torch.where(valid, d_ap, nan).detach()
    stats_an = torch.where(valid, d_an, nan).detach()
    if not bool(valid.any()):
        return features.sum() * 0.0, stats_ap, stats_an
    gap = d_ap[valid] - d_an[valid]
    per_anchor = F.softplus(gap) if soft_margin else F.relu(gap + margin)
    return per_anchor.mean(), stats_ap, stats_an


class TripletLoss(nn.Module):
    """Batch-hard triplet loss (module form of :func:`batch_hard_triplet_loss`).

    Args:
        margin: hinge margin (BoT: 0.3).
        metric: ``"euclidean"`` or ``"cosine"``.
        soft_margin: ``softplus(d_ap − d_an)`` instead of the hinge.
    """

    def __init__(
        self,
        margin: float = 0.3,
        *,
        metric: DistanceMetric = "euclidean",
        soft_margin: bool = False,
    ) -> None:
        super().__init__()
        if metric not in ("euclidean", "cosine"):
            raise ValueError(
                f"unknown distance metric {metric!r}: expected 'euclidean' or 'cosine'"
            )
        if margin < 0:
            raise ValueError(f"margin must be ≥ 0, got {margin}")
        self.margin = margin
        self.metric: DistanceMetric = metric
        self.soft_margin = soft_margin

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``features [B, D]``, ``labels [B]`` → scalar loss."""
        loss, _, _ = batch_hard_triplet_loss(
            features,
            labels,
            margin=self.margin,
            metric=self.metric,
            soft_margin=self.soft_margin,
        )
        return loss

    def extra_repr(self) -> str:
        kind = "soft" if self.soft_margin else f"margin={self.margin}"
        return f"{kind}, metric={self.metric}"
