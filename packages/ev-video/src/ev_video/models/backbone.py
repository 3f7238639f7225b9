"""STPT backbone: 3D patch stem, hierarchical stages, local window attention early, global late.

Shapes: input ``[B, 3, T, H, W]``; the stem (Conv3d, kernel ``(3, 4, 4)``, stride
``(2, 4, 4)``) gives ``[B, T/2·H/4·W/4, C₀]`` tokens; every later stage starts with a stride-2
3D merge (Conv3d kernel 2, stride 2), halving ``T``, ``H`` and ``W``. A stage whose window is
``None`` uses global spatio-temporal attention (:class:`ev_core.layers.MultiHeadSelfAttention`
over all tokens), the others :class:`~ev_video.models.attention.WindowAttention3D`. Each block
is ``x + DWConv3d(x)`` (conditional position encoding), ``x + Attn(LN(x))``,
``x + MLP(LN(x))``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch.nn.functional as F
from timm.layers import DropPath
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ev_core.layers import Mlp, MultiHeadSelfAttention
from ev_video.models.attention import WindowAttention3D

__all__ = ["PatchMerging3D", "STPTBackbone", "STPTBlock", "Stem3D"]

Window = tuple[int, int, int] | None


def _to_grid(x: Tensor, thw: tuple[int, int, int]) -> Tensor:
    B, _, C = x.shape
    return x.transpose(1, 2).reshape(B, C, *thw)


class Stem3D(nn.Module):
    """3D patch embedding: Conv3d + LayerNorm → tokens ``[B, N, C]`` and ``(T, H, W)``."""

    def __init__(
        self, in_chans: int, dim: int, kernel: Sequence[int], stride: Sequence[int]
    ) -> None:
        super().__init__()
        kernel, stride = tuple(kernel), tuple(stride)
        pad = tuple((k - s + 1) // 2 for k, s in zip(kernel, stride, strict=True))
        self.proj = nn.Conv3d(in_chans, dim, kernel_size=kernel, stride=stride, padding=pad)  # type: ignore[arg-type]
        self.norm = nn.LayerNorm(dim)
        self.stride = stride

    def forward(self, x: Tensor) -> tuple[Tensor, tuple[int, int, int]]:
        if x.dim() != 5:
            raise ValueError(f"expected clips [B, C, T, H, W], got shape {tuple(x.shape)}")
        pads = [(-s) % st for s, st in zip(x.shape[2:], self.stride, strict=True)]
        if any(pads):
            x = F.pad(x, (0, pads[2], 0, pads[1], 0, pads[0]), mode="replicate")
        x = self.proj(x)
        thw = tuple(x.shape[2:])
        return self.norm(x.flatten(2).transpose(1, 2)), thw  # type: ignore[return-value]


class PatchMerging3D(nn.Module):
    """Stride-2 3D token merging (Conv3d kernel 2, stride 2; odd extents padded) + LayerNorm."""

    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__()
        self.reduction = nn.Conv3d(dim, out_dim, kernel_size=2, stride=2)
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, x: Tensor, thw: tuple[int, int, int]) -> tuple[Tensor, tuple[int, int, int]]:
        grid = _to_grid(x, thw)
        pads = [s % 2 for s in thw]
        if any(pads):
            grid = F.pad(grid, (0, pads[2], 0, pads[1], 0, pads[0]), mode="replicate")
        grid = self.reduction(grid)
        new = tuple(grid.shape[2:])
        return self.norm(grid.flatten(2).transpose(1, 2)), (new[0], new[1], new[2])


class STPTBlock(nn.Module):
    """One transformer block with local-window (``window``) or global (``None``) attention."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window: Window,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        self.pos = nn.Conv3d(dim, dim, kernel_size=3, padding=1, groups=dim)
        self.norm1 = nn.LayerNorm(dim)
        self.window = window
        self.attn: nn.Module = (
            MultiHeadSelfAttention(dim, num_heads, backend=backend)
            if window is None
            else WindowAttention3D(dim, num_heads, window, backend=backend)
        )
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor, thw: tuple[int, int, int]) -> Tensor:
        x = x + self.pos(_to_grid(x, thw)).flatten(2).transpose(1, 2)
        y = self.norm1(x)
        y = self.attn(y) if self.window is None else self.attn(y, thw)
        x = x + self.drop_path(y)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class STPTBackbone(nn.Module):
    """Hierarchical spatio-temporal transformer.

    Args:
        in_chans: input channels.
        dims: channels per stage.
        depths: blocks per stage.
        num_heads: heads per stage.
        windows: ``(wt, wh, ww)`` local window per stage, ``None`` = global attention.
        mlp_ratio: MLP hidden ratio.
        drop_path_rate: stochastic depth, linear over all blocks.
        stem_kernel: stem Conv3d kernel.
        stem_stride: stem Conv3d stride.
        attention_backend: ev-core attention backend (``None`` = default).
        grad_checkpointing: recompute blocks in backward (saves activation memory).
    """

    def __init__(
        self,
        in_chans: int = 3,
        dims: Sequence[int] = (64, 128, 256, 512),
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (2, 4, 8, 16),
        windows: Sequence[Window] = ((8, 6, 6), (8, 6, 6), None, None),
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.1,
        stem_kernel: Sequence[int] = (3, 4, 4),
        stem_stride: Sequence[int] = (2, 4, 4),
        attention_backend: str | None = None,
        grad_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        n = len(dims)
        if not (len(depths) == len(num_heads) == len(windows) == n):
            raise ValueError("dims, depths, num_heads and windows need one entry per stage")
        total = sum(depths)
        rates = [drop_path_rate * i / (total - 1) if total > 1 else 0.0 for i in range(total)]
        self.stem = Stem3D(in_chans, dims[0], stem_kernel, stem_stride)
        self.merges = nn.ModuleList(
            [nn.Identity()] + [PatchMerging3D(dims[i - 1], dims[i]) for i in range(1, n)]
        )
        self.stages = nn.ModuleList()
        k = 0
        for i in range(n):
            blocks = []
            for _ in range(depths[i]):
                win = windows[i]
                w = None if win is None else (int(win[0]), int(win[1]), int(win[2]))
                blocks.append(
                    STPTBlock(dims[i], num_heads[i], w, mlp_ratio, rates[k], attention_backend)
                )
                k += 1
            self.stages.append(nn.ModuleList(blocks))
        self.dims = list(dims)
        self.temporal_strides = [int(stem_stride[0]) * 2**i for i in range(n)]
        self.grad_checkpointing = grad_checkpointing

    def forward(self, x: Tensor) -> list[tuple[Tensor, tuple[int, int, int]]]:
        """Args:
            x: ``[B, C, T, H, W]``.

        Returns:
            Per stage ``(tokens [B, Tᵢ·Hᵢ·Wᵢ, Cᵢ], (Tᵢ, Hᵢ, Wᵢ))``.
        """
        x, thw = self.stem(x)
        outs = []
        for i, blocks in enumerate(self.stages):
            if i > 0:
                x, thw = self.merges[i](x, thw)
            for blk in cast(nn.ModuleList, blocks):
                if self.grad_checkpointing and self.training:
                    x = checkpoint(blk, x, thw, use_reentrant=False)
                else:
                    x = blk(x, thw)
            outs.append((x, thw))
        return outs
