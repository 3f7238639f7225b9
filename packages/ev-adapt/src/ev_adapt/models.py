"""Backbone + MME's cosine classifier, and a small CNN for the digits experiments."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ev_core.errors import EvError

__all__ = ["AdaptModelConfig", "AdaptNet", "DigitsCNN", "build_model", "grad_reverse"]


class _GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return -ctx.scale * grad, None


def grad_reverse(x: Tensor, scale: float = 1.0) -> Tensor:
    """Identity forward, gradient multiplied by ``−scale`` backward (MME's reversal layer)."""
    return _GradReverse.apply(x, scale)


class DigitsCNN(nn.Module):
    """A small convolutional backbone for 1×16×16 digit images (``num_features`` = 4·width = 64)."""

    def __init__(self, in_chans: int = 1, width: int = 16) -> None:
        super().__init__()
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(in_chans, w, 3, padding=1, bias=False),
            nn.BatchNorm2d(w),
            nn.ReLU(inplace=True),
            nn.Conv2d(w, 2 * w, 3, padding=1, bias=False),
            nn.BatchNorm2d(2 * w),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 4 * w, 3, padding=1, bias=False),
            nn.BatchNorm2d(4 * w),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.num_features = 4 * w

    def forward(self, x: Tensor) -> Tensor:
        """``[B, in_chans, H, W]`` → ``[B, num_features]``."""
        return self.body(x)


@dataclass
class AdaptModelConfig:
    """What :func:`build_model` builds (stored beside checkpoints).

    Attributes:
        backbone: ``"digits_cnn"`` or any timm model name (ev models included).
        num_classes: number of classes.
        bottleneck_dim: width of fc1 (512 in MCL).
        temperature: the cosine classifier's T (0.05).
        pretrained: load the backbone's pretrained weights through timm (needs them cached).
        in_chans: input channels.
    """

    backbone: str = "resnet34"
    num_classes: int = 126
    bottleneck_dim: int = 512
    temperature: float = 0.05
    pretrained: bool = False
    in_chans: int = 3


class AdaptNet(nn.Module):
    """Backbone → fc1 → L2-normalise (the feature) → fc2 without bias, divided by T.

    Args:
        backbone: a module mapping images to ``[B, F]`` pooled features with ``num_features``.
        num_classes: ``C``.
        bottleneck_dim: fc1's width ``D``.
        temperature: ``T``.
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        bottleneck_dim: int = 512,
        temperature: float = 0.05,
    ) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.backbone = backbone
        self.fc1 = nn.Linear(int(backbone.num_features), bottleneck_dim)  # type: ignore[arg-type]
        self.fc2 = nn.Linear(bottleneck_dim, num_classes, bias=False)
        nn.init.normal_(self.fc2.weight, std=0.1)
        self.temperature = temperature

    def features(self, x: Tensor) -> Tensor:
        """Images → L2-normalised features ``[B, D]``."""
        return F.normalize(self.fc1(self.backbone(x)), dim=1)

    def classify(self, features: Tensor) -> Tensor:
        """Features ``[B, D]`` → logits ``[B, C]`` (``fc2(f) / T``)."""
        return self.fc2(features) / self.temperature

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Images → ``(logits [B, C], features [B, D])``."""
        feats = self.features(x)
        return self.classify(feats), feats

    def classifier_parameters(self) -> list[nn.Parameter]:
        """fc1 and fc2 (MCL trains them with 10× the backbone's learning rate)."""
        return [*self.fc1.parameters(), *self.fc2.parameters()]


def build_model(config: AdaptModelConfig) -> AdaptNet:
    """Build the backbone (``digits_cnn`` or a timm/ev model without its head) and the classifier.

    Raises:
        EvError: for an unknown backbone name.
    """
    if config.backbone == "digits_cnn":
        backbone: nn.Module = DigitsCNN(in_chans=config.in_chans)
    else:
        import timm

        import ev_core  # noqa: F401  (registers ev models with timm)

        if not timm.is_model(config.backbone):
            raise EvError(
                f"--backbone {config.backbone!r} is not a timm or ev model (see timm.list_models())"
            )
        backbone = timm.create_model(
            config.backbone, pretrained=config.pretrained, num_classes=0, in_chans=config.in_chans
        )
    return AdaptNet(backbone, config.num_classes, config.bottleneck_dim, config.temperature)
