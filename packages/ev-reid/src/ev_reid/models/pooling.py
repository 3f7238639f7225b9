"""Pooling for re-id heads: generalised-mean (GeM) and average pooling, global or per stripe."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GeneralizedMeanPooling", "gem", "stripe_pool"]


def gem(
    x: torch.Tensor,
    p: torch.Tensor | float = 3.0,
    *,
    eps: float = 1e-6,
    output_size: tuple[int, int] = (1, 1),
) -> torch.Tensor:
    """Generalised-mean pooling ``(mean over the window of clamp(x, eps)^p)^(1/p)``.

    ``p = 1`` is average pooling of the clamped map, ``p → ∞`` tends to max pooling.

    Args:
        x: feature map ``[B, C, H, W]``.
        p: the exponent (a float or a scalar tensor, possibly learnable).
        eps: lower clamp that keeps the power well defined (post-ReLU maps are ≥ 0).
        output_size: ``(rows, cols)`` of adaptive pooling bins (``(P, 1)`` for P stripes).

    Returns:
        ``[B, C, rows, cols]``.
    """
    if x.dim() != 4:
        raise ValueError(f"gem expects a [B, C, H, W] map, got shape {tuple(x.shape)}")
    return F.adaptive_avg_pool2d(x.clamp(min=eps).pow(p), output_size).pow(1.0 / p)


def stripe_pool(
    x: torch.Tensor, num_stripes: int, *, mode: str = "avg", p: torch.Tensor | float = 3.0
) -> torch.Tensor:
    """Pool a feature map into ``num_stripes`` horizontal stripes (top to bottom).

    Rows are split with adaptive pooling bins (equal stripes when ``H`` is divisible by
    ``num_stripes``).

    Args:
        x: ``[B, C, H, W]``.
        num_stripes: number of horizontal stripes P (≤ H).
        mode: ``"avg"`` or ``"gem"``.
        p: the GeM exponent (ignored for ``"avg"``).

    Returns:
        ``[B, P, C]``: one pooled vector per stripe.
    """
    if x.dim() != 4:
        raise ValueError(f"stripe_pool expects a [B, C, H, W] map, got shape {tuple(x.shape)}")
    if not 1 <= num_stripes <= x.shape[2]:
        raise ValueError(
            f"num_stripes must be in [1, H={x.shape[2]}] (rows of the feature map), got "
            f"{num_stripes}: use taller images or a backbone with last_stride_1"
        )
    if mode == "avg":
        pooled = F.adaptive_avg_pool2d(x, (num_stripes, 1))
    elif mode == "gem":
        pooled = gem(x, p, output_size=(num_stripes, 1))
    else:
        raise ValueError(f"unknown pooling mode {mode!r}: expected 'avg' or 'gem'")
    return pooled.squeeze(-1).transpose(1, 2)


class GeneralizedMeanPooling(nn.Module):
    """GeM pooling with an optionally learnable exponent.

    Args:
        p: initial exponent (> 0).
        learnable: make ``p`` a trainable parameter.
        eps: lower clamp of the input.
    """

    def __init__(self, p: float = 3.0, *, learnable: bool = True, eps: float = 1e-6) -> None:
        super().__init__()
        if p <= 0:
            raise ValueError(f"GeM exponent must be positive, got {p}")
        self.eps = eps
        if learnable:
            self.p = nn.Parameter(torch.tensor(float(p)))
        else:
            self.register_buffer("p", torch.tensor(float(p)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x: [B, C, H, W]`` → ``[B, C]``."""
        return gem(x, self.p, eps=self.eps).flatten(1)

    def extra_repr(self) -> str:
        return f"p={float(self.p):.3f}, eps={self.eps}"
