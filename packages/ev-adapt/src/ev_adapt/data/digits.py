"""A real domain shift at toy cost: scikit-learn's handwritten digits → a transformed copy.

Source: real handwritten 8×8 digits (``sklearn.datasets.load_digits``), upsampled to 16×16.
Target: the *other* half of the images, each rotated by a fixed random angle
(±[20°, 45°]), blurred (Gaussian, σ = 1 px) and contrast-inverted, all fixed by the seed.
Labelled target: ``shots`` images per class; validation: 3 per class; test = unlabelled target.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ev_adapt.data.domains import TensorDomainData
from ev_core.errors import require

__all__ = ["digits_shift", "strong_augment", "weak_augment"]

SIZE = 16


def _rotate(x: Tensor, angles: Tensor) -> Tensor:
    cos, sin = torch.cos(angles), torch.sin(angles)
    zeros = torch.zeros_like(cos)
    theta = torch.stack([torch.stack([cos, -sin, zeros], 1), torch.stack([sin, cos, zeros], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, align_corners=False, padding_mode="zeros")


def _blur(x: Tensor, sigma: float) -> Tensor:
    radius = max(1, math.ceil(2 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    return F.conv2d(F.pad(x, (0, 0, radius, radius), mode="replicate"), k.view(1, 1, -1, 1))


def weak_augment(x: Tensor, generator: torch.Generator) -> Tensor:
    """Random translation by up to 2 px (reflect padding + random crop), per image.

    Args:
        x: ``[B, 1, H, W]`` in [0, 1].
        generator: the RNG.
    """
    b, _, h, w = x.shape
    padded = F.pad(x, (2, 2, 2, 2), mode="reflect")
    dy = torch.randint(0, 5, (b,), generator=generator)
    dx = torch.randint(0, 5, (b,), generator=generator)
    rows = (dy.view(b, 1) + torch.arange(h)).view(b, 1, h, 1).expand(b, x.shape[1], h, w + 4)
    cropped = torch.gather(padded, 2, rows)
    cols = (dx.view(b, 1) + torch.arange(w)).view(b, 1, 1, w).expand(b, x.shape[1], h, w)
    return torch.gather(cropped, 3, cols)


def strong_augment(x: Tensor, generator: torch.Generator) -> Tensor:
    """Weak + random rotation (±15°), contrast/brightness jitter, noise and a 6×6 cutout.

    Args:
        x: ``[B, 1, H, W]`` in [0, 1].
        generator: the RNG.
    """
    b, _, h, w = x.shape
    x = weak_augment(x, generator)
    angles = (torch.rand(b, generator=generator) * 2 - 1) * math.radians(15)
    x = _rotate(x, angles)
    contrast = 0.6 + 0.8 * torch.rand(b, 1, 1, 1, generator=generator)
    brightness = (torch.rand(b, 1, 1, 1, generator=generator) - 0.5) * 0.4
    mean = x.mean(dim=(2, 3), keepdim=True)
    x = (x - mean) * contrast + mean + brightness
    x = x + 0.05 * torch.randn(x.shape, generator=generator)
    cy = torch.randint(0, h, (b,), generator=generator).view(b, 1, 1, 1)
    cx = torch.randint(0, w, (b,), generator=generator).view(b, 1, 1, 1)
    ys = torch.arange(h).view(1, 1, h, 1)
    xs = torch.arange(w).view(1, 1, 1, w)
    hole = ((ys - cy).abs() <= 3) & ((xs - cx).abs() <= 3)
    return x.masked_fill(hole, 0.5).clamp(0.0, 1.0)


def _pick_per_class(
    labels: Tensor, per_class: int, gen: torch.Generator, exclude: Tensor
) -> Tensor:
    chosen = []
    for c in labels.unique().tolist():
        pool = torch.nonzero((labels == c) & ~exclude).flatten()
        chosen.append(pool[torch.randperm(len(pool), generator=gen)[:per_class]])
    return torch.cat(chosen)


def digits_shift(seed: int = 0, shots: int = 3) -> TensorDomainData:
    """The digits → transformed-digits scenario with ``shots`` labelled target images per class.

    Args:
        seed: fixes the source/target split, the target transformation and the labelled shots.
        shots: labelled target images per class (1 or 3 in the benchmark).

    Returns:
        A :class:`~ev_adapt.data.domains.TensorDomainData` of 1×16×16 images in [0, 1].

    Raises:
        MissingDependencyError: without scikit-learn (``pip install 'ev-adapt[digits]'``).
    """
    if shots < 1:
        raise ValueError(f"shots must be >= 1, got {shots}")
    datasets = require("sklearn.datasets", "digits", "ev-adapt", "the digits domain shift")
    bunch = datasets.load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(bunch.target, dtype=torch.long)
    images = F.interpolate(images, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(labels), generator=gen)
    src, tgt = order[: len(order) // 2], order[len(order) // 2 :]
    x_t = images[tgt]
    sign = torch.where(torch.rand(len(tgt), generator=gen) < 0.5, -1.0, 1.0)
    angles = sign * torch.deg2rad(20 + 25 * torch.rand(len(tgt), generator=gen))
    x_t = 1.0 - _blur(_rotate(x_t, angles), sigma=1.0).clamp(0, 1)
    y_t = labels[tgt]
    none = torch.zeros(len(y_t), dtype=torch.bool)
    lab = _pick_per_class(y_t, shots, gen, none)
    taken = none.clone()
    taken[lab] = True
    val = _pick_per_class(y_t, 3, gen, taken)
    taken[val] = True
    unl = torch.nonzero(~taken).flatten()
    splits = {
        "source": (images[src], labels[src]),
        "labeled_target": (x_t[lab], y_t[lab]),
        "unlabeled_target": (x_t[unl], y_t[unl]),
        "validation": (x_t[val], y_t[val]),
        "test": (x_t[unl], y_t[unl]),
    }
    return TensorDomainData(splits, weak_augment, strong_augment, num_classes=10)
