"""Spatial-reduction attention (PVT / PVTv2): queries at full resolution, keys/values from a
reduced map.

* PVT (``linear=False``): K, V come from ``Conv2d(C, C, k=s, stride=s)`` + LayerNorm of the
  map, ``N/s²`` tokens (``sr_ratio = 1``: no reduction, plain MSA). A map side that is not a
  multiple of ``s`` loses its last ``H mod s`` rows / ``W mod s`` columns in the reduction
  (strided-conv floor), as in PVT.
* PVTv2-Li (``linear=True``): ``AdaptiveAvgPool2d(7)`` → 1×1 conv → LayerNorm → GELU, 49 key
  tokens whatever the resolution (``sr_ratio`` is ignored).

Parameter names (``q``, ``kv``, ``sr``, ``norm``, ``proj``) are those of the official PVTv2 code
and timm's ``pvt_v2`` ``Attention``, so their state dicts load 1:1.
"""

from __future__ import annotations

from torch import Tensor, nn

from ev_core.layers.attention import attention, check_tokens, settle_backend

__all__ = ["SpatialReductionAttention"]


class SpatialReductionAttention(nn.Module):
    """PVT spatial-reduction attention, O(N²C/s²) (linear variant: O(49·N·C)).

    Args:
        dim: channels ``C``.
        num_heads: heads ``h`` (``C`` divisible by ``h``).
        sr_ratio: reduction ``s`` of the strided conv (PVTv2 uses 8, 4, 2, 1 per stage).
        linear: PVTv2-Li variant (average pool to ``pool_size²`` tokens + 1×1 conv + LN + GELU).
        qkv_bias: bias on the ``q`` and ``kv`` projections.
        qk_scale: logit scale override (default ``d ** -0.5``).
        attn_drop: attention dropout.
        proj_drop: output dropout.
        pool_size: output side of the adaptive average pool of the linear variant (7).
        norm_eps: LayerNorm epsilon of the reduction (1e-5 as in PVT/PVTv2).
        backend: attention backend (:func:`~ev_core.layers.attention.settle_backend`), settled
            at construction.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        sr_ratio: int = 1,
        linear: bool = False,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        pool_size: int = 7,
        norm_eps: float = 1e-5,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        if num_heads <= 0 or dim % num_heads != 0:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        if sr_ratio < 1:
            raise ValueError(f"sr_ratio must be >= 1, got {sr_ratio}")
        if pool_size < 1:
            raise ValueError(f"pool_size must be >= 1, got {pool_size}")
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = qk_scale if qk_scale is not None else self.head_dim**-0.5
        self.sr_ratio = sr_ratio
        self.linear = linear
        self.backend: str = settle_backend(backend)
        self.attn_drop = attn_drop
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.pool: nn.Module | None = None
        self.sr: nn.Conv2d | None = None
        self.norm: nn.LayerNorm | None = None
        self.act: nn.Module | None = None
        if linear:
            self.pool = nn.AdaptiveAvgPool2d(pool_size)
            self.sr = nn.Conv2d(dim, dim, kernel_size=1, stride=1)
            self.norm = nn.LayerNorm(dim, eps=norm_eps)
            self.act = nn.GELU()
        elif sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dim, eps=norm_eps)

    def forward(self, x: Tensor, hw: tuple[int, int]) -> Tensor:
        """Args:
            x: ``[B, N, C]`` row-major over the ``H × W`` map.
            hw: ``(H, W)``; with the conv reduction both must be ``>= sr_ratio``.

        Returns:
            ``[B, N, C]``.
        """
        B, N, C, H, W = check_tokens(x, hw)
        if self.dim != C:
            raise ValueError(f"expected {self.dim} channels, got {C}")
        h, d = self.num_heads, self.head_dim
        q = self.q(x).view(B, N, h, d).transpose(1, 2)
        kv_in = x
        if self.sr is not None and self.norm is not None:
            if not self.linear and (self.sr_ratio > H or self.sr_ratio > W):
                raise ValueError(f"map {H}x{W} is smaller than sr_ratio {self.sr_ratio}")
            m = x.transpose(1, 2).reshape(B, C, H, W)
            if self.pool is not None:
                m = self.pool(m)
            kv_in = self.norm(self.sr(m).flatten(2).transpose(1, 2))
            if self.act is not None:
                kv_in = self.act(kv_in)
        kv = self.kv(kv_in).view(B, -1, 2, h, d).permute(2, 0, 3, 1, 4)
        k, v = kv.unbind(0)
        dropout_p = self.attn_drop if self.training else 0.0
        out = attention(q, k, v, None, self.scale, dropout_p, self.backend)
        out = out.transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(out))

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_heads={self.num_heads}, sr_ratio={self.sr_ratio}, "
            f"linear={self.linear}"
        )
