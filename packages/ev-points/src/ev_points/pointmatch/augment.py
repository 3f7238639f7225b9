"""Weak and strong views of the same points (no point is dropped, so indices stay aligned)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["AugmentConfig", "strong_view", "weak_view"]


@dataclass
class AugmentConfig:
    """Augmentation strengths (SYSTEMS §5.1 recommended design).

    Attributes:
        scale: uniform scale range (weak).
        jitter: Gaussian coordinate noise σ of the weak view (metres).
        strong_jitter: extra σ of the strong view, clipped to ``strong_jitter_clip``.
        colour_jitter: σ of the per-point colour noise of the strong view (0..1 colours).
        brightness: range of the strong view's per-scene brightness/contrast change.
        elastic: amplitude (metres) of the strong view's smooth distortion.
        elastic_wavelength: its spatial period (metres).
    """

    scale: tuple[float, float] = (0.9, 1.1)
    jitter: float = 0.005
    strong_jitter: float = 0.01
    strong_jitter_clip: float = 0.05
    colour_jitter: float = 0.05
    brightness: float = 0.2
    elastic: float = 0.02
    elastic_wavelength: float = 0.5


def _uniform(b: int, lo: float, hi: float, like: Tensor) -> Tensor:
    return torch.rand(b, 1, 1, device=like.device, dtype=like.dtype) * (hi - lo) + lo


def weak_view(xyz: Tensor, rgb: Tensor, cfg: AugmentConfig) -> tuple[Tensor, Tensor]:
    """Random z-rotation, x-flip, scale and small jitter of ``xyz [B, P, 3]``; colours unchanged."""
    b = xyz.shape[0]
    theta = torch.rand(b, device=xyz.device, dtype=xyz.dtype) * (2 * math.pi)
    c, s = torch.cos(theta), torch.sin(theta)
    rot = torch.zeros(b, 3, 3, device=xyz.device, dtype=xyz.dtype)
    rot[:, 0, 0], rot[:, 0, 1], rot[:, 1, 0], rot[:, 1, 1], rot[:, 2, 2] = c, -s, s, c, 1
    flip = torch.where(torch.rand(b, device=xyz.device) < 0.5, -1.0, 1.0).to(xyz.dtype)
    rot[:, :, 0] *= flip[:, None]
    center = xyz.mean(1, keepdim=True)
    out = (xyz - center) @ rot.transpose(1, 2) * _uniform(b, *cfg.scale, xyz) + center
    return out + torch.randn_like(out) * cfg.jitter, rgb


def strong_view(xyz: Tensor, rgb: Tensor, cfg: AugmentConfig) -> tuple[Tensor, Tensor]:
    """The strong view of a weak view: more jitter (clipped), a smooth distortion, colour jitter
    and a random brightness/contrast change."""
    b = xyz.shape[0]
    noise = (torch.randn_like(xyz) * cfg.strong_jitter).clamp(
        -cfg.strong_jitter_clip, cfg.strong_jitter_clip
    )
    # smooth distortion: a random low-frequency sinusoidal displacement field
    freq = torch.randn(b, 3, 3, device=xyz.device, dtype=xyz.dtype) * (
        2 * math.pi / cfg.elastic_wavelength
    )
    phase = torch.rand(b, 1, 3, device=xyz.device, dtype=xyz.dtype) * (2 * math.pi)
    field = torch.sin(xyz @ freq + phase) * cfg.elastic
    contrast = _uniform(b, 1 - cfg.brightness, 1 + cfg.brightness, rgb)
    shift = _uniform(b, -cfg.brightness / 2, cfg.brightness / 2, rgb)
    mean = rgb.mean(1, keepdim=True)
    colour = (rgb - mean) * contrast + mean + shift + torch.randn_like(rgb) * cfg.colour_jitter
    return xyz + noise + field, colour.clamp(0, 1)
