"""BoT's training loss (:class:`ReidCriterion`) and the forward of one batch (:func:`train_step`)."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from ev_reid.losses import DistanceMetric, TripletLoss, label_smoothed_cross_entropy
from ev_reid.models.reid import ReidOutput
from ev_reid.train.config import TrainConfig

__all__ = ["ReidCriterion", "train_step"]


def _upcast(t: torch.Tensor) -> torch.Tensor:
    """Losses run in float32 under autocast (float64 stays float64)."""
    return t if t.dtype == torch.float64 else t.float()


class ReidCriterion(nn.Module):
    """BoT loss: label-smoothed identity CE (+ mean over stripes) and batch-hard triplet.

    Args:
        label_smoothing: ε.
        id_weight: identity-loss weight.
        triplet_weight: triplet-loss weight.
        margin: triplet margin.
        metric: triplet distance.
        soft_margin: soft-margin triplet.
    """

    def __init__(
        self,
        *,
        label_smoothing: float = 0.1,
        id_weight: float = 1.0,
        triplet_weight: float = 1.0,
        margin: float = 0.3,
        metric: DistanceMetric = "euclidean",
        soft_margin: bool = False,
    ) -> None:
        super().__init__()
        self.label_smoothing = label_smoothing
        self.id_weight = id_weight
        self.triplet_weight = triplet_weight
        self.triplet = TripletLoss(margin, metric=metric, soft_margin=soft_margin)

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> ReidCriterion:
        """The criterion of a :class:`TrainConfig`."""
        return cls(
            label_smoothing=cfg.label_smoothing,
            id_weight=cfg.id_weight,
            triplet_weight=cfg.triplet_weight,
            margin=cfg.triplet_margin,
            metric=cfg.triplet_metric,
            soft_margin=cfg.soft_margin,
        )

    def forward(
        self, out: ReidOutput, pids: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Total loss and its (detached) parts for a training-mode model output.

        Args:
            out: the model's :class:`~ev_reid.models.ReidOutput`.
            pids: training identities ``[B]`` in ``[0, num_classes)``.

        Returns:
            ``(loss, logs)`` with ``logs`` holding ``id``, ``triplet`` and ``accuracy``.
        """
        logs: dict[str, torch.Tensor] = {}
        total = out.features.new_zeros(())
        if self.id_weight > 0:
            if out.logits is None:
                raise ValueError("the identity loss needs a classifier: set num_classes > 0")
            id_loss = label_smoothed_cross_entropy(_upcast(out.logits), pids, self.label_smoothing)
            if out.part_logits is not None:
                parts = [
                    label_smoothed_cross_entropy(
                        _upcast(out.part_logits[:, i]), pids, self.label_smoothing
                    )
                    for i in range(out.part_logits.shape[1])
                ]
                id_loss = (id_loss + torch.stack(parts).sum()) / (1 + len(parts))
            total = total + self.id_weight * id_loss
            logs["id"] = id_loss.detach()
            logs["accuracy"] = (out.logits.argmax(dim=1) == pids).float().mean().detach()
        if self.triplet_weight > 0:
            tri = self.triplet(_upcast(out.features), pids)
            total = total + self.triplet_weight * tri
            logs["triplet"] = tri.detach()
        logs["loss"] = total.detach()
        return total, logs


def train_step(
    model: nn.Module,
    criterion: ReidCriterion,
    images: torch.Tensor,
    pids: torch.Tensor,
    *,
    autocast: contextlib.AbstractContextManager[Any] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Forward and loss of one batch (no backward, no optimizer step).

    Args:
        model: a training-mode :class:`~ev_reid.models.ReidModel` (possibly DDP-wrapped).
        criterion: the loss.
        images: ``[B, 3, H, W]``.
        pids: ``[B]``.
        autocast: optional autocast context for the forward.

    Returns:
        ``(loss, logs)`` as :meth:`ReidCriterion.forward`.
    """
    with autocast if autocast is not None else contextlib.nullcontext():
        out = model(images)
    if not isinstance(out, ReidOutput):
        raise TypeError("train_step needs the model in training mode (it returned features)")
    return criterion(out, pids)
