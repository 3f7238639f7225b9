"""Backbone adapters for self-supervised pre-training with :mod:`ev_core.ssl`.

:class:`FeatureMapBackbone` gives a ``features_only`` backbone the timm-style interface that
:class:`ev_core.ssl.ContrastiveEncoder` expects, so the very backbone :class:`ReidModel` uses is
pre-trained (its ``body.*`` weights transfer unchanged); :class:`StripeProjection` is the
extra head that embeds horizontal stripes of the feature map (UP-ReID's local term).
"""

from __future__ import annotations

import torch
from torch import nn

from ev_core.ssl import EncoderOutput, ProjectionHead
from ev_reid.models.pooling import stripe_pool

__all__ = ["FeatureMapBackbone", "StripeProjection"]


class FeatureMapBackbone(nn.Module):
    """timm-style view (``forward_features`` / ``forward_head``) of a ``features_only`` backbone.

    Lets :class:`ev_core.ssl.ContrastiveEncoder` expose the feature map ``[B, C, H, W]`` of the
    very backbone :class:`~ev_reid.models.ReidModel` uses, so that its weights (``body.*``)
    transfer to fine-tuning unchanged.

    Args:
        body: a backbone from :func:`~ev_reid.models.create_backbone`.
        channels: its output channels ``C``.
    """

    def __init__(self, body: nn.Module, channels: int) -> None:
        super().__init__()
        self.body = body
        self.num_features = channels

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, 3, H, W]`` → ``[B, C, h, w]``."""
        out: torch.Tensor = self.body(x)[-1]
        return out

    def forward_head(self, x: torch.Tensor, pre_logits: bool = True) -> torch.Tensor:
        """Global average pooling ``[B, C, h, w]`` → ``[B, C]`` (there are no logits)."""
        return x.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, 3, H, W]`` → pooled ``[B, C]``."""
        return self.forward_head(self.forward_features(x))


class StripeProjection(nn.Module):
    """Extra head: average-pool ``num_stripes`` horizontal stripes and project each to ``D``.

    One MLP (:class:`ev_core.ssl.ProjectionHead`) is shared by all stripes.

    Args:
        channels: feature-map channels ``C``.
        num_stripes: S.
        hidden_dim: MLP hidden width.
        out_dim: embedding dimension ``D`` (UP-ReID: 128).
    """

    def __init__(
        self, channels: int, num_stripes: int = 3, hidden_dim: int = 2048, out_dim: int = 128
    ) -> None:
        super().__init__()
        if num_stripes < 1:
            raise ValueError(f"num_stripes must be >= 1, got {num_stripes}")
        self.num_stripes = num_stripes
        self.head = ProjectionHead(channels, hidden_dim, out_dim)

    def forward(self, output: EncoderOutput) -> torch.Tensor:
        """``output.feature_map [B, C, H, W]`` → stripe embeddings ``[B, S, D]``."""
        fmap = output.feature_map
        if fmap is None or fmap.ndim != 4:
            raise ValueError("StripeProjection needs a [B, C, H, W] feature map")
        stripes = stripe_pool(fmap, self.num_stripes)  # [B, S, C]
        b, s, c = stripes.shape
        out: torch.Tensor = self.head(stripes.reshape(b * s, c))
        return out.reshape(b, s, -1)
