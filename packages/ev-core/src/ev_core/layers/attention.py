"""Attention primitives shared by every ev attention layer.

Calling convention of every ev attention *module*: ``forward(x, hw)`` with tokens
``x: [B, N, C]`` (row-major over an ``H × W`` map, ``N = H·W``) and ``hw = (H, W)``, returning
``[B, N, C]``.

The core op :func:`attend` computes ``softmax(q·kᵀ·scale + bias)·v`` either through
:func:`torch.nn.functional.scaled_dot_product_attention` (``fused=True``) or through explicit
matmul/softmax maths (``fused=False``), like timm's ``fused_attn`` switch; tests compare the
two. ``fused=None`` uses the module-wide default (:func:`use_fused_attention`).
"""

from __future__ import annotations

import os

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["MultiHeadSelfAttention", "attend", "set_fused_attention", "use_fused_attention"]

_FUSED_DEFAULT = os.environ.get("EV_FUSED_ATTN", "1").strip().lower() not in {"0", "false", "no"}


def set_fused_attention(enabled: bool) -> None:
    """Set the default of every ``fused=None`` attention (also ``EV_FUSED_ATTN=0`` at import)."""
    global _FUSED_DEFAULT
    _FUSED_DEFAULT = enabled


def use_fused_attention(fused: bool | None = None) -> bool:
    """Resolve a per-module ``fused`` setting against the global default."""
    return _FUSED_DEFAULT if fused is None else fused


def attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    bias: Tensor | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    fused: bool | None = None,
) -> Tensor:
    """softmax(q·kᵀ·scale + bias)·v.

    Args:
        q: ``[B, h, Nq, d]``.
        k: ``[B, h, Nk, d]``.
        v: ``[B, h, Nk, dv]``.
        bias: additive logits bias broadcastable to ``[B, h, Nq, Nk]`` (e.g. a relative
            position bias ``[h, Nq, Nk]`` or a ``-inf`` mask), same dtype as ``q``.
        scale: logit scale, default ``d ** -0.5``.
        dropout_p: attention dropout probability (apply only in training).
        fused: ``True`` = SDPA, ``False`` = explicit maths, ``None`` = global default.

    Returns:
        ``[B, h, Nq, dv]``.
    """
    if use_fused_attention(fused):
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, dropout_p=dropout_p, scale=scale
        )
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    attn = (q * scale) @ k.transpose(-2, -1)
    if bias is not None:
        attn = attn + bias
    attn = attn.softmax(dim=-1)
    if dropout_p > 0.0:
        attn = F.dropout(attn, p=dropout_p)
    return attn @ v


class MultiHeadSelfAttention(nn.Module):
    """Global multi-head self-attention (ViT / LIT-Ti), O(N²C).

    Parameter names (``qkv``, ``proj``) follow timm and the official LIT code.

    Args:
        dim: channels ``C``.
        num_heads: heads ``h`` (``C`` divisible by ``h``).
        qkv_bias: bias on the qkv projection.
        qk_scale: logit scale override (default ``d ** -0.5``).
        attn_drop: attention dropout.
        proj_drop: output dropout.
        fused: ``True`` SDPA, ``False`` explicit maths, ``None`` global default.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        fused: bool | None = None,
    ) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = qk_scale if qk_scale is not None else self.head_dim**-0.5
        self.fused = fused
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(
        self, x: Tensor, hw: tuple[int, int] | None = None, bias: Tensor | None = None
    ) -> Tensor:
        """Args:
            x: ``[B, N, C]``.
            hw: ``(H, W)`` with ``H·W = N`` (unused: global attention has no spatial structure).
            bias: optional additive logits bias broadcastable to ``[B, h, N, N]``.

        Returns:
            ``[B, N, C]``.
        """
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        out = attend(
            q,
            k,
            v,
            bias=bias,
            scale=self.scale,
            dropout_p=self.attn_drop if self.training else 0.0,
            fused=self.fused,
        )
        out = out.transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(out))
