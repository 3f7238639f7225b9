"""Temporal feature pyramid, anchor-free detection head, target assignment and losses.

Pyramid: the last ``len(in_dims)`` backbone stages are pooled over space (max by default: a
small actor's tokens would vanish in a mean over the frame; ``"mean"`` and ``"meanmax"``
(their sum) are available), projected to
``dim`` channels (1x1 Conv1d + GroupNorm) and extended with stride-2 Conv1d levels until there
are ``num_levels``; level ``l`` has temporal stride ``sₗ`` (in input frames).

Head (ActionFormer's design, SYSTEMS.md §4.1): shared conv towers over every level; a
classification branch (sigmoid logits per class, bias initialised to the prior 0.01) and a
regression branch giving the distances ``(to start, to end)`` of each point in units of its
level's stride (ReLU of a per-level learnt scale times the conv output).

Targets: a point at level ``l`` (centre ``cₗᵢ = (i + 0.5)·sₗ`` frames) is positive for a
segment when it lies within ``radius·sₗ`` of the segment's centre (and inside it) and its
larger distance to the ends is in the level's regression range ``[lo·sₗ, hi·sₗ]``; among
several, the shortest segment wins. Losses: sigmoid focal loss over every point and class,
1D DIoU loss on positives, both normalised by the number of positives.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import sigmoid_focal_loss

__all__ = ["DetectionHead", "TemporalPyramid", "assign_targets", "diou_loss_1d", "make_points"]


class TemporalPyramid(nn.Module):
    """Spatially pooled backbone stages → ``num_levels`` 1D feature maps ``[B, dim, Lₗ]``."""

    def __init__(
        self,
        in_dims: Sequence[int],
        in_strides: Sequence[int],
        dim: int,
        num_levels: int,
        pool: str = "max",
    ) -> None:
        super().__init__()
        if pool not in ("max", "mean", "meanmax"):
            raise ValueError(f"spatial pool must be 'max', 'mean' or 'meanmax', got {pool!r}")
        self.pool = pool
        if num_levels < len(in_dims):
            raise ValueError(f"num_levels ({num_levels}) < pyramid inputs ({len(in_dims)})")
        self.lateral = nn.ModuleList(
            nn.Sequential(nn.Conv1d(c, dim, 1), nn.GroupNorm(1, dim), nn.GELU()) for c in in_dims
        )
        self.down = nn.ModuleList(
            nn.Sequential(
                nn.Conv1d(dim, dim, 3, stride=2, padding=1), nn.GroupNorm(1, dim), nn.GELU()
            )
            for _ in range(num_levels - len(in_dims))
        )
        last = int(in_strides[-1])
        self.strides = [int(s) for s in in_strides] + [
            last * 2 ** (k + 1) for k in range(len(self.down))
        ]

    def forward(self, stages: Sequence[tuple[Tensor, tuple[int, int, int]]]) -> list[Tensor]:
        feats = []
        for (x, (T, H, W)), lat in zip(stages, self.lateral, strict=True):
            B, _, C = x.shape
            grid = x.view(B, T, H * W, C)
            if self.pool == "max":
                pooled = grid.amax(2)
            elif self.pool == "mean":
                pooled = grid.mean(2)
            else:
                pooled = grid.amax(2) + grid.mean(2)
            pooled = pooled.transpose(1, 2)  # [B, C, T]
            feats.append(lat(pooled))
        for down in self.down:
            feats.append(down(feats[-1]))
        return feats


class _Scale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale


def _tower(dim: int, layers: int) -> nn.Sequential:
    mods: list[nn.Module] = []
    for _ in range(layers):
        mods += [nn.Conv1d(dim, dim, 3, padding=1), nn.GroupNorm(1, dim), nn.ReLU(inplace=True)]
    return nn.Sequential(*mods)


class DetectionHead(nn.Module):
    """Anchor-free classification + start/end regression head shared over pyramid levels."""

    def __init__(
        self, dim: int, num_classes: int, num_levels: int, layers: int = 2, prior: float = 0.01
    ) -> None:
        super().__init__()
        self.cls_tower = _tower(dim, layers)
        self.reg_tower = _tower(dim, layers)
        self.cls_out = nn.Conv1d(dim, num_classes, 3, padding=1)
        self.reg_out = nn.Conv1d(dim, 2, 3, padding=1)
        self.scales = nn.ModuleList(_Scale() for _ in range(num_levels))
        assert self.cls_out.bias is not None
        nn.init.constant_(self.cls_out.bias, -math.log((1 - prior) / prior))

    def forward(self, feats: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """Args:
            feats: per level ``[B, D, Lₗ]``.

        Returns:
            ``cls_logits [B, P, K]`` and ``distances [B, P, 2]`` (stride units, >= 0) over all
            ``P = ΣLₗ`` points, level by level.
        """
        cls, reg = [], []
        for f, scale in zip(feats, self.scales, strict=True):
            cls.append(self.cls_out(self.cls_tower(f)).transpose(1, 2))
            reg.append(F.relu(scale(self.reg_out(self.reg_tower(f)))).transpose(1, 2))
        return torch.cat(cls, 1), torch.cat(reg, 1)


def make_points(
    lengths: Sequence[int],
    strides: Sequence[int],
    ranges: Sequence[tuple[float, float]],
    device: torch.device | None = None,
) -> Tensor:
    """Point table ``[P, 4]``: ``(centre frame, stride, range lo, range hi)`` per point."""
    rows = []
    for n, s, (lo, hi) in zip(lengths, strides, ranges, strict=True):
        c = (torch.arange(n, dtype=torch.float32, device=device) + 0.5) * s
        rows.append(
            torch.stack(
                [c, torch.full_like(c, s), torch.full_like(c, lo), torch.full_like(c, hi)], 1
            )
        )
    return torch.cat(rows, 0)


def assign_targets(
    points: Tensor, segments: Tensor, labels: Tensor, num_classes: int, radius: float = 1.5
) -> tuple[Tensor, Tensor]:
    """Targets of one clip.

    Args:
        points: ``[P, 4]`` from :func:`make_points`.
        segments: ``[G, 2]`` (start, end) in input frames.
        labels: ``[G]`` class ids.
        num_classes: ``K``.
        radius: centre-sampling radius in strides.

    Returns:
        ``cls_target [P, K]`` (one-hot, zeros for negatives) and ``reg_target [P, 2]``
        (distances to start/end in stride units; meaningful where ``cls_target`` has a 1).
    """
    P = points.shape[0]
    cls_t = torch.zeros(P, num_classes, device=points.device)
    reg_t = torch.zeros(P, 2, device=points.device)
    if segments.numel() == 0:
        return cls_t, reg_t
    c, s, lo, hi = points[:, 0:1], points[:, 1:2], points[:, 2:3], points[:, 3:4]
    g0, g1 = segments[:, 0][None], segments[:, 1][None]  # [1, G]
    left, right = c - g0, g1 - c  # [P, G]
    centre = (g0 + g1) / 2
    lo_c = torch.maximum(g0, centre - radius * s)
    hi_c = torch.minimum(g1, centre + radius * s)
    inside = (c > lo_c) & (c < hi_c)
    far = torch.maximum(left, right)
    ok = inside & (far >= lo * s) & (far <= hi * s)
    length = (g1 - g0).expand(P, -1).masked_fill(~ok, float("inf"))
    best_len, best = length.min(1)
    pos = torch.isfinite(best_len)
    if pos.any():
        idx = pos.nonzero().squeeze(1)
        g = best[idx]
        cls_t[idx, labels[g]] = 1.0
        reg_t[idx, 0] = left[idx, g] / s[idx, 0]
        reg_t[idx, 1] = right[idx, g] / s[idx, 0]
    return cls_t, reg_t


def diou_loss_1d(pred: Tensor, target: Tensor, eps: float = 1e-8) -> Tensor:
    """1D Distance-IoU loss between distance pairs ``[N, 2]`` of the same points (elementwise).

    ``1 - IoU + (centre offset)² / (enclosing length)²``.
    """
    pl, pr = pred.unbind(-1)
    tl, tr = target.unbind(-1)
    inter = torch.minimum(pl, tl) + torch.minimum(pr, tr)
    union = pl + pr + tl + tr - inter
    iou = inter / union.clamp_min(eps)
    enclose = torch.maximum(pl, tl) + torch.maximum(pr, tr)
    rho = ((pr - pl) - (tr - tl)) / 2
    return 1.0 - iou + rho.square() / enclose.square().clamp_min(eps)


def detection_loss(
    cls_logits: Tensor,
    distances: Tensor,
    points: Tensor,
    segments: Sequence[Tensor],
    labels: Sequence[Tensor],
    radius: float = 1.5,
    alpha: float = 0.25,
    gamma: float = 2.0,
    reg_weight: float = 1.0,
) -> dict[str, Tensor]:
    """Focal + DIoU loss of a batch (normalised by the number of positive points).

    Returns:
        ``{"loss", "cls_loss", "reg_loss", "num_pos"}``.
    """
    K = cls_logits.shape[-1]
    cls_t, reg_t = [], []
    for seg, lab in zip(segments, labels, strict=True):
        a, b = assign_targets(points, seg.to(points.device), lab.to(points.device), K, radius)
        cls_t.append(a)
        reg_t.append(b)
    cls_target = torch.stack(cls_t)
    reg_target = torch.stack(reg_t)
    pos = cls_target.sum(-1) > 0
    num_pos = pos.sum().clamp_min(1).to(cls_logits.dtype)
    cls_loss = (
        sigmoid_focal_loss(
            cls_logits.float(), cls_target, alpha=alpha, gamma=gamma, reduction="sum"
        )
        / num_pos
    )
    if pos.any():
        reg_loss = diou_loss_1d(distances[pos].float(), reg_target[pos]).sum() / num_pos
    else:
        reg_loss = distances.sum() * 0.0
    loss = cls_loss + reg_weight * reg_loss
    return {
        "loss": loss,
        "cls_loss": cls_loss.detach(),
        "reg_loss": reg_loss.detach(),
        "num_pos": num_pos.detach(),
    }
