"""Deformable token merging (DTM, LIT / LITv2) with a fast bf16-capable path.

DTM replaces patch merging between stages: tokens ``[B, H·W, C]`` are viewed as a map, merged by
a 2×2 stride-2 deformable convolution (DCNv1, one offset group, no modulation mask) to ``2C``
channels (or any ``C_out``), batch-normalised and passed through GELU. The offsets come from a
zero-initialised ``Conv2d(C, 8, k=2, s=2)``, so a fresh DTM is exactly patch merging
(pixel-unshuffle + linear).

Two interchangeable paths compute the deformable convolution:

* ``"torchvision"`` -- the reference, :func:`torchvision.ops.deform_conv2d` (fp32/fp64/fp16; no
  bf16 CPU kernel; its autocast wrapper casts everything to fp32).
* ``"fast"`` (default) -- :func:`deform_merge_2x2`: because kernel = stride = 2, the four taps of
  different outputs never overlap, so the im2col matrix is input-sized. Each output bilinearly
  samples its four tap points (gathers in the activation dtype, coordinates in fp32/fp64) and a
  single GEMM with the weight permuted tap-major (``[C_out, 4·C]``, column ``k·C + c``) maps
  the ``[B·Ho·Wo, 4·C]`` samples to the output. Pure PyTorch: any dtype (bf16 included), any
  device, autograd backward, ``torch.compile`` friendly, and it works on channels-last (NHWC)
  tokens without a layout change.

Sampling semantics (identical to DCNv1 / torchvision): output ``(oy, ox)``, tap ``k = 2i + j``
with offset ``(Δy_k, Δx_k)`` (offset channels ``[Δy₀, Δx₀, Δy₁, Δx₁, …]``) samples the input at
``y = 2·oy + i + Δy_k``, ``x = 2·ox + j + Δx_k`` bilinearly, corners outside the map contribute
zero. Odd sizes are floored like ``deform_conv2d(k=2, s=2, p=0)``: ``Ho = ⌊H/2⌋``, ``Wo = ⌊W/2⌋``.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "DTMPath",
    "DeformConv2x2",
    "DeformableTokenMerging",
    "deform_merge_2x2",
    "deform_merge_2x2_nhwc",
]

DTMPath = Literal["fast", "torchvision"]
_PATHS = ("fast", "torchvision")


def _bilinear_taps_nhwc(x: Tensor, offset: Tensor) -> Tensor:
    """Bilinear samples of the four 2×2 taps of every output.

    Args:
        x: ``[B, H, W, C]`` input map (any floating dtype).
        offset: ``[B, Ho, Wo, 8]`` offsets ``[Δy₀, Δx₀, …, Δy₃, Δx₃]`` in pixels.

    Returns:
        ``[B, Ho, Wo, 4·C]``, tap-major (column ``k·C + c``), in ``x``'s dtype.
    """
    B, H, W, C = x.shape
    Ho, Wo = offset.shape[1], offset.shape[2]
    # Coordinates in at least fp32: bf16 cannot even represent integer pixel positions > 256.
    pdt = torch.promote_types(offset.dtype, torch.float32)
    off = offset.to(pdt).reshape(B, Ho, Wo, 4, 2)
    tap_i = torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=pdt, device=x.device)
    tap_j = torch.tensor([0.0, 1.0, 0.0, 1.0], dtype=pdt, device=x.device)
    base_y = torch.arange(Ho, dtype=pdt, device=x.device).mul(2).view(Ho, 1, 1) + tap_i
    base_x = torch.arange(Wo, dtype=pdt, device=x.device).mul(2).view(1, Wo, 1) + tap_j
    py = base_y + off[..., 0]  # [B, Ho, Wo, 4]
    px = base_x + off[..., 1]
    y0 = torch.floor(py)
    x0 = torch.floor(px)
    ly = py - y0
    lx = px - x0
    hy = 1.0 - ly
    hx = 1.0 - lx
    y0i = y0.long()
    x0i = x0.long()
    flat = x.reshape(B * H * W, C)
    batch_base = (torch.arange(B, device=x.device) * (H * W)).view(B, 1, 1, 1)
    out: Tensor | None = None
    for dy, dx, w in ((0, 0, hy * hx), (0, 1, hy * lx), (1, 0, ly * hx), (1, 1, ly * lx)):
        yy = y0i + dy
        xx = x0i + dx
        valid = (yy >= 0) & (yy < H) & (xx >= 0) & (xx < W)
        idx = yy.clamp(0, H - 1) * W + xx.clamp(0, W - 1) + batch_base
        vals = flat.index_select(0, idx.reshape(-1)).view(B, Ho, Wo, 4, C)
        term = vals * (w * valid).to(x.dtype).unsqueeze(-1)
        out = term if out is None else out + term
    assert out is not None
    return out.reshape(B, Ho, Wo, 4 * C)


def deform_merge_2x2_nhwc(
    x: Tensor, offset: Tensor, weight: Tensor, bias: Tensor | None = None
) -> Tensor:
    """Fast 2×2 stride-2 deformable convolution on channels-last maps.

    Args:
        x: ``[B, H, W, C]``.
        offset: ``[B, Ho, Wo, 8]`` with ``Ho = ⌊H/2⌋``, ``Wo = ⌊W/2⌋``; channels
            ``[Δy₀, Δx₀, …, Δy₃, Δx₃]``, tap ``k = 2i + j``.
        weight: ``[C_out, C, 2, 2]`` (the ``deform_conv2d`` / ``Conv2d`` layout).
        bias: ``[C_out]`` or ``None``.

    Returns:
        ``[B, Ho, Wo, C_out]``.
    """
    B, H, W, C = x.shape
    Ho, Wo = H // 2, W // 2
    if weight.shape[1:] != (C, 2, 2):
        raise ValueError(f"weight must be [C_out, {C}, 2, 2], got {tuple(weight.shape)}")
    if offset.shape != (B, Ho, Wo, 8):
        raise ValueError(f"offset must be [{B}, {Ho}, {Wo}, 8] for x {tuple(x.shape)}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must be [{weight.shape[0]}], got {tuple(bias.shape)}")
    cols = _bilinear_taps_nhwc(x, offset)
    # [C_out, C, i, j] -> [C_out, i, j, C] -> [C_out, 4C]: column k·C + c with k = 2i + j.
    w_tap = weight.permute(0, 2, 3, 1).reshape(weight.shape[0], 4 * C)
    return F.linear(cols, w_tap, bias)


def deform_merge_2x2(
    x: Tensor, offset: Tensor, weight: Tensor, bias: Tensor | None = None
) -> Tensor:
    """Fast ``deform_conv2d(x, offset, weight, bias, stride=2, padding=0)`` for 2×2 kernels.

    Same arguments and result as :func:`torchvision.ops.deform_conv2d` with a 2×2 kernel,
    stride 2, no padding, no dilation, one offset group and no mask, but computed as
    bilinear sampling + one GEMM (any dtype, any device, autograd backward).

    Args:
        x: ``[B, C, H, W]``.
        offset: ``[B, 8, Ho, Wo]`` with ``Ho = ⌊H/2⌋``, ``Wo = ⌊W/2⌋``; channels
            ``[Δy₀, Δx₀, …, Δy₃, Δx₃]``, tap ``k = 2i + j``.
        weight: ``[C_out, C, 2, 2]``.
        bias: ``[C_out]`` or ``None``.

    Returns:
        ``[B, C_out, Ho, Wo]`` (channels-last memory format).
    """
    if x.dim() != 4 or offset.dim() != 4 or weight.dim() != 4:
        raise ValueError("x, offset and weight must be 4-D ([B,C,H,W], [B,8,Ho,Wo], [O,C,2,2])")
    out = deform_merge_2x2_nhwc(x.permute(0, 2, 3, 1), offset.permute(0, 2, 3, 1), weight, bias)
    return out.permute(0, 3, 1, 2)


class DeformConv2x2(nn.Module):
    """2×2 stride-2 deformable convolution with its own zero-initialised offset predictor.

    Parameter names follow the official LIT/LITv2 checkpoints: ``weight``, ``bias`` and
    ``conv_offset.{weight,bias}``.

    Args:
        in_channels: input channels ``C``.
        out_channels: output channels ``C_out``.
        path: ``"fast"`` (:func:`deform_merge_2x2`) or ``"torchvision"`` (reference).
    """

    def __init__(self, in_channels: int, out_channels: int, path: DTMPath = "fast") -> None:
        super().__init__()
        if path not in _PATHS:
            raise ValueError(f"path must be one of {_PATHS}, got {path!r}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.path: DTMPath = path
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, 2, 2))
        self.bias = nn.Parameter(torch.empty(out_channels))
        self.conv_offset = nn.Conv2d(in_channels, 8, kernel_size=2, stride=2)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Conv2d's default init for the kernel; zero offsets (DTM starts as patch merging)."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        bound = 1.0 / math.sqrt(self.in_channels * 4)
        nn.init.uniform_(self.bias, -bound, bound)
        nn.init.zeros_(self.conv_offset.weight)
        if self.conv_offset.bias is not None:
            nn.init.zeros_(self.conv_offset.bias)

    def forward(self, x: Tensor) -> Tensor:
        """Args:
            x: ``[B, H, W, C]`` channels-last map.

        Returns:
            ``[B, ⌊H/2⌋, ⌊W/2⌋, C_out]``.
        """
        x_nchw = x.permute(0, 3, 1, 2)  # a channels-last view, no copy
        offset = self.conv_offset(x_nchw)
        if self.path == "fast":
            return deform_merge_2x2_nhwc(x, offset.permute(0, 2, 3, 1), self.weight, self.bias)
        from torchvision.ops import deform_conv2d

        out = deform_conv2d(
            x_nchw.contiguous(), offset.contiguous(), self.weight, self.bias, stride=2
        )
        return out.permute(0, 2, 3, 1)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size=2, stride=2, path={self.path}"


class DeformableTokenMerging(nn.Module):
    """DTM: deformable 2×2/s2 conv → BatchNorm2d → GELU, on tokens.

    State-dict names match the official code: ``dconv.weight``, ``dconv.bias``,
    ``dconv.conv_offset.{weight,bias}``, ``norm_layer.*`` (BatchNorm2d).

    Args:
        dim: input channels ``C``.
        out_dim: output channels (``2C`` between LIT/LITv2 stages).
        path: ``"fast"`` (default) or ``"torchvision"`` reference.
    """

    def __init__(self, dim: int, out_dim: int, path: DTMPath = "fast") -> None:
        super().__init__()
        self.dconv = DeformConv2x2(dim, out_dim, path=path)
        self.norm_layer = nn.BatchNorm2d(out_dim)
        self.act = nn.GELU()

    @property
    def path(self) -> DTMPath:
        """The deformable-conv path in use."""
        return self.dconv.path

    @path.setter
    def path(self, value: DTMPath) -> None:
        if value not in _PATHS:
            raise ValueError(f"path must be one of {_PATHS}, got {value!r}")
        self.dconv.path = value

    def forward(self, x: Tensor, hw: tuple[int, int]) -> tuple[Tensor, tuple[int, int]]:
        """Args:
            x: ``[B, H·W, C]`` tokens (row-major).
            hw: ``(H, W)``; odd sizes are floored.

        Returns:
            ``([B, ⌊H/2⌋·⌊W/2⌋, C_out], (⌊H/2⌋, ⌊W/2⌋))``.
        """
        B, N, C = x.shape
        H, W = hw
        if N != H * W:
            raise ValueError(f"got {N} tokens for a {H}x{W} map")
        if H < 2 or W < 2:
            raise ValueError(f"DTM needs a map of at least 2x2, got {H}x{W}")
        y = self.dconv(x.reshape(B, H, W, C))  # [B, Ho, Wo, C_out]
        y = self.norm_layer(y.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        y = self.act(y)
        Ho, Wo = y.shape[1], y.shape[2]
        return y.reshape(B, Ho * Wo, y.shape[3]), (Ho, Wo)
