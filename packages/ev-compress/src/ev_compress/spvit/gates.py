"""SPViT's binary gates: relaxed Bernoulli samples with a hard threshold and straight-through
gradients, and the cumulative product that turns three gates into one choice per block.

* Training: ``g ~ RelaxedBernoulli(σ(θ), T=1)``: logits ``l = (logit(u) + θ) / T`` with
  ``u ~ U(0, 1)``; forward value ``1[l > 0]``, gradient of ``σ(l)`` (straight-through).
* Evaluation: ``g = 1[σ(θ) > 0.5] = 1[θ > 0]``.
* FLOPs loss: the deterministic ``1[σ(θ) > 0.5]`` with the gradient of ``σ(σ(θ) − 0.5)``
  (the official code's indicator for the complexity term).
* Per block, ``(g₁, g₂, g₃) → cumprod``: ``g₃·MSA + g₂(1−g₃)·Conv3×3 + g₁(1−g₂)(1−g₃)·Conv1×1``;
  all zero = the residual alone. While a higher gate is on, the lower ones are detached.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "branch_coefficients",
    "choice_index",
    "cumulative_gates",
    "flops_indicator",
    "relaxed_bernoulli_st",
]

_EPS = torch.finfo(torch.float32).eps


def relaxed_bernoulli_st(
    theta: Tensor, temperature: float = 1.0, generator: torch.Generator | None = None
) -> Tensor:
    """Hard 0/1 samples of ``Bernoulli(σ(θ))`` with relaxed (straight-through) gradients.

    Args:
        theta: gate logits (the ``*_thresholds`` parameters), any shape.
        temperature: relaxation temperature.
        generator: RNG for the logistic noise.

    Returns:
        Same shape as ``theta``: values in {0, 1}, gradient ``∂σ(l)/∂θ``.
    """
    u = torch.rand(theta.shape, generator=generator, device=theta.device, dtype=theta.dtype)
    u = u.clamp(_EPS, 1 - _EPS)
    logits = (torch.log(u) - torch.log1p(-u) + theta) / temperature
    soft = torch.sigmoid(logits)
    hard = (logits > 0).to(soft.dtype)
    return hard + (soft - soft.detach())  # exactly 0/1 forward, σ(l) gradient


def flops_indicator(theta: Tensor) -> Tensor:
    """Deterministic gate for the FLOPs loss: ``1[σ(θ) > 0.5]`` with the gradient of
    ``σ(σ(θ) − 0.5)``."""
    p = torch.sigmoid(theta)
    s = torch.sigmoid(p - 0.5)
    return (p > 0.5).to(p.dtype) + (s - s.detach())


def cumulative_gates(raw: Tensor, detach_lower: bool = True) -> Tensor:
    """``cumprod`` of the three block gates; lower gates detached while a higher one is on.

    Args:
        raw: ``[3]`` gates ``(g₁: conv1×1, g₂: conv3×3, g₃: attention)``.
        detach_lower: detach ``g₁`` when ``g₂`` is on and ``g₂`` when ``g₃`` is on.

    Returns:
        ``[3]`` cumulative gates.
    """
    g = torch.cumprod(raw, dim=0)
    if not detach_lower:
        return g
    g1, g2, g3 = g.unbind(0)
    g1 = torch.where(g2 > 0.5, g1.detach(), g1)
    g2 = torch.where(g3 > 0.5, g2.detach(), g2)
    return torch.stack((g1, g2, g3))


def branch_coefficients(g: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(attention, conv3×3, conv1×1)`` weights from cumulative gates ``[3]``."""
    g1, g2, g3 = g.unbind(0)
    return g3, g2 * (1 - g3), g1 * (1 - g2) * (1 - g3)


def choice_index(theta: Tensor) -> int:
    """Evaluation choice of a block: the number of leading gates with ``θ > 0``
    (0 skip, 1 conv1×1, 2 conv3×3, 3 attention)."""
    return int(torch.cumprod((theta.detach() > 0).to(torch.int64), dim=0).sum())
