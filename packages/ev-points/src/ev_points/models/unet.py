"""A point U-Net on the ev-points ops (PointNet++-style encoder/decoder).

Encoder: ``len(channels) - 1`` levels, each keeps ``1/stride`` of the points by farthest-point
sampling, groups the K nearest points of the previous level (relative xyz + features), applies
a shared MLP and max-pools over the group. Decoder: three-NN inverse-distance interpolation back
to the finer level, concatenated with the skip features, then a shared MLP. A linear head gives
per-point class logits.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ev_points.ops import knn_gather, knn_points, sample_farthest_points

__all__ = ["PointPyramid", "PointUNet", "PointUNetConfig", "build_pyramid"]


@dataclass
class PointUNetConfig:
    """Architecture of :class:`PointUNet`.

    Attributes:
        in_channels: per-point input features (3 = rgb).
        num_classes: output classes.
        channels: feature width of the stem and of each encoder level.
        stride: points kept per level = previous // stride (farthest-point sampling).
        k: neighbours grouped per sampled point.
        dropout: before the head.
    """

    in_channels: int = 3
    num_classes: int = 13
    channels: tuple[int, ...] = (32, 64, 128, 256, 512)
    stride: int = 4
    k: int = 16
    dropout: float = 0.0

    @classmethod
    def tiny(cls, num_classes: int, in_channels: int = 3) -> PointUNetConfig:
        """A small 3-level model for CPU demos and tests."""
        return cls(
            in_channels=in_channels,
            num_classes=num_classes,
            channels=(32, 48, 96, 160),
            stride=4,
            k=12,
        )


class SharedMLP(nn.Sequential):
    """Linear → BatchNorm → ReLU applied to the last dim of ``[..., C]`` tensors."""

    def __init__(self, dims: list[int]) -> None:
        layers: list[nn.Module] = []
        for a, b in itertools.pairwise(dims):
            layers += [nn.Linear(a, b, bias=False), _ChannelsLastBN(b), nn.ReLU(inplace=True)]
        super().__init__(*layers)


class _ChannelsLastBN(nn.BatchNorm1d):
    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        return super().forward(x.reshape(-1, shape[-1])).reshape(shape)


@dataclass
class PointPyramid:
    """Coordinates and neighbourhoods of every level (independent of the features).

    Attributes:
        xyz: per level ``[B, P_l, 3]`` (level 0 = input points).
        group_idx: per level l ≥ 1, ``[B, P_l, K]`` indices into level ``l - 1``.
        up_idx / up_weight: per level l ≥ 1, three-NN indices into level l and weights, for
            interpolating level l features to level ``l - 1`` (``[B, P_{l-1}, 3]``).
    """

    xyz: list[Tensor] = field(default_factory=list)
    group_idx: list[Tensor] = field(default_factory=list)
    up_idx: list[Tensor] = field(default_factory=list)
    up_weight: list[Tensor] = field(default_factory=list)


@torch.no_grad()
def build_pyramid(xyz: Tensor, levels: int, stride: int, k: int) -> PointPyramid:
    """Sample the levels of :class:`PointUNet` for ``xyz [B, P, 3]`` (no gradient)."""
    pyr = PointPyramid(xyz=[xyz])
    cur = xyz
    for _ in range(levels):
        m = max(1, cur.shape[1] // stride)
        sub, _ = sample_farthest_points(cur, K=m)
        sub = sub.to(xyz.dtype)
        group = knn_points(sub, cur, K=min(k, cur.shape[1])).idx
        d, idx = knn_points(cur, sub, K=min(3, sub.shape[1]))[:2]
        w = 1.0 / (d.clamp_min(0).sqrt() + 1e-8)
        pyr.xyz.append(sub)
        pyr.group_idx.append(group)
        pyr.up_idx.append(idx)
        pyr.up_weight.append(w / w.sum(-1, keepdim=True))
        cur = sub
    return pyr


class PointUNet(nn.Module):
    """Per-point semantic segmentation network.

    Input: ``xyz [B, P, 3]`` (metres) and ``feats [B, P, in_channels]``. Output: logits
    ``[B, P, num_classes]``.
    """

    def __init__(self, config: PointUNetConfig | None = None) -> None:
        super().__init__()
        self.config = cfg = config or PointUNetConfig()
        ch = list(cfg.channels)
        self.levels = len(ch) - 1
        self.stem = SharedMLP([cfg.in_channels + 3, ch[0], ch[0]])
        self.down = nn.ModuleList(
            SharedMLP([ch[i] + 3, ch[i + 1], ch[i + 1]]) for i in range(self.levels)
        )
        self.up = nn.ModuleList(
            SharedMLP([ch[i + 1] + ch[i], ch[i], ch[i]]) for i in range(self.levels)
        )
        self.dropout = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(ch[0], cfg.num_classes)

    def pyramid(self, xyz: Tensor) -> PointPyramid:
        """The sampling/neighbour structure for ``xyz`` (reusable across forwards)."""
        return build_pyramid(xyz, self.levels, self.config.stride, self.config.k)

    def forward(self, xyz: Tensor, feats: Tensor, pyramid: PointPyramid | None = None) -> Tensor:
        """Logits ``[B, P, num_classes]``."""
        pyr = pyramid if pyramid is not None else self.pyramid(xyz)
        centered = xyz - xyz.mean(1, keepdim=True)
        x = self.stem(torch.cat([centered, feats], -1))
        skips = [x]
        for level, mlp in enumerate(self.down):
            fine_xyz, idx = pyr.xyz[level], pyr.group_idx[level]
            coarse_xyz = pyr.xyz[level + 1]
            rel = knn_gather(fine_xyz, idx) - coarse_xyz[:, :, None, :]
            grouped = torch.cat([rel / (rel.detach().norm(dim=-1).amax((1, 2), keepdim=True)[..., None] + 1e-6),
                                 knn_gather(x, idx)], -1)  # fmt: skip
            x = mlp(grouped).amax(2)
            skips.append(x)
        for level in reversed(range(self.levels)):
            idx, w = pyr.up_idx[level], pyr.up_weight[level]
            up = (knn_gather(x, idx) * w[..., None].to(x.dtype)).sum(2)
            x = self.up[level](torch.cat([up, skips[level]], -1))
        return self.head(self.dropout(x))
