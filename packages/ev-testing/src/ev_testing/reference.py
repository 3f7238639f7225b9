"""Explicit, naive PyTorch maths used as independent references in tests.

Nothing here is optimised: each function spells out the textbook formula so that a fast
implementation can be compared against it (in float64 for tight tolerances).
"""

from __future__ import annotations

import math

import torch


def naive_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    bias: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """softmax(q·kᵀ·scale + bias, masked) · v.

    Args:
        q: ``[..., Nq, d]``.
        k: ``[..., Nk, d]``.
        v: ``[..., Nk, dv]``.
        scale: defaults to ``d ** -0.5``.
        bias: additive ``[..., Nq, Nk]`` (broadcastable).
        mask: boolean ``[..., Nq, Nk]`` (broadcastable), ``True`` = attend.

    Returns:
        ``[..., Nq, dv]``.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    logits = torch.einsum("...qd,...kd->...qk", q, k) * scale
    if bias is not None:
        logits = logits + bias
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    weights = torch.exp(logits - logits.amax(dim=-1, keepdim=True))
    weights = weights / weights.sum(dim=-1, keepdim=True)
    return torch.einsum("...qk,...kd->...qd", weights, v)
