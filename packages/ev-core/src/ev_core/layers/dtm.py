"""Deformable token merging (DTM, LIT / LITv2) with a fast bf16-capable path.

DTM replaces patch merging between stages: tokens ``[B, H·W, C]`` are viewed as a map, merged by
a 2×2 stride-2 deformable convolution (DCNv1, one offset group, no modulation mask) to ``2C``
channels (or any ``C_out``), batch-normalised and passed through GELU. The offsets come from a
zero-initialised ``Conv2d(C, 8, k=2, s=2)``, so a fresh DTM is exactly patch merging
(pixel-unshuffle + linear).

Two interchangeable paths compute the deformable convolution, and ``path="auto"`` (the model
default) runs whichever is the fastest *correct* one for the device and compute dtype, measured
once per process on the first eager call (:func:`measured_dtm_path`; traced and scripted
code take the cached choice, else ``"fast"``; ``torch.compile`` always compiles ``"fast"``):

* ``"torchvision"`` -- the reference, :func:`torchvision.ops.deform_conv2d` (fp32/fp64/fp16; no
  bf16 CPU kernel; its autocast wrapper casts everything to fp32).
* ``"fast"`` (default) -- :func:`deform_merge_2x2`: because kernel = stride = 2, the four taps of
  different outputs never overlap, so the im2col matrix is input-sized. Each output bilinearly
  samples its four tap points (gathers in the activation dtype, coordinates in fp32/fp64) and a
  single GEMM with the weight permuted tap-major (``[C_out, 4·C]``, column ``k·C + c``) maps
  the ``[B·Ho·Wo, 4·C]`` samples to the output. Pure PyTorch: any dtype (bf16 included), any
  device, ``torch.compile`` friendly, and it works on channels-last (NHWC) tokens without a
  layout change. Its backward is a custom autograd function that saves only the input, the
  offsets and the weight and recomputes the gathers (plain autograd would keep five
  input-sized tensors: the four gathered corners and the tap matrix).

Sampling semantics (identical to DCNv1 / torchvision): output ``(oy, ox)``, tap ``k = 2i + j``
with offset ``(Δy_k, Δx_k)`` (offset channels ``[Δy₀, Δx₀, Δy₁, Δx₁, …]``) samples the input at
``y = 2·oy + i + Δy_k``, ``x = 2·ox + j + Δx_k`` bilinearly, corners outside the map contribute
zero. Odd sizes are floored like ``deform_conv2d(k=2, s=2, p=0)``: ``Ho = ⌊H/2⌋``, ``Wo = ⌊W/2⌋``.
"""

import math
import time
from typing import Any, Literal

import torch
import torch.nn.functional as F
from timm.layers import register_notrace_module
from torch import Tensor, nn
from torch.utils._python_dispatch import _get_current_dispatch_mode
from torchvision.ops import deform_conv2d

from ev_core.layers.onednn import plain_modules

__all__ = [
    "DTM_PATH_CACHE",
    "DTMPath",
    "DeformConv2x2",
    "DeformableTokenMerging",
    "deform_merge_2x2",
    "deform_merge_2x2_nhwc",
    "measured_dtm_path",
]

DTMPath = Literal["auto", "fast", "torchvision"]
_PATHS = ("auto", "fast", "torchvision")

#: ``(device type, compute dtype, C_in, C_out)`` → the fastest correct path, measured once per
#: process by :func:`measured_dtm_path` (cleared with ``DTM_PATH_CACHE.clear()``).
DTM_PATH_CACHE: dict[tuple[str, torch.dtype, int, int], str] = {}


def _corners(
    offset: Tensor, H: int, W: int
) -> list[tuple[int, int, Tensor, Tensor, Tensor, Tensor]]:
    """Bilinear corners of the four 2×2 tap points of every output.

    Args:
        offset: ``[B, Ho, Wo, 8]`` offsets ``[Δy₀, Δx₀, …, Δy₃, Δx₃]`` in pixels.
        H: input height.
        W: input width.

    Returns:
        For the corners ``(dy, dx)`` in ``(0, 0), (0, 1), (1, 0), (1, 1)``: ``dy``, ``dx``,
        ``idx`` (``[B, Ho, Wo, 4]`` rows of the ``[B·H·W, C]`` input, clamped into the map),
        ``wy``, ``wx`` (the bilinear factors, ``[B, Ho, Wo, 4]``, coordinate dtype) and
        ``valid`` (``[B, Ho, Wo, 4]`` bool, corner inside the map). The sample of tap ``k`` is
        ``Σ_corners x[idx]·wy·wx·valid``.
    """
    B, Ho, Wo = offset.shape[0], offset.shape[1], offset.shape[2]
    dev = offset.device
    # Coordinates in at least fp32: bf16 cannot even represent integer pixel positions > 256.
    pdt = torch.promote_types(offset.dtype, torch.float32)
    off = offset.to(pdt)
    tap_i = torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=pdt, device=dev)
    tap_j = torch.tensor([0.0, 1.0, 0.0, 1.0], dtype=pdt, device=dev)
    base_y = torch.arange(Ho, dtype=pdt, device=dev).mul(2).view(Ho, 1, 1) + tap_i
    base_x = torch.arange(Wo, dtype=pdt, device=dev).mul(2).view(1, Wo, 1) + tap_j
    # strided slices, not a reshape to [..., 4, 2] + select: under torch.compile with a dynamic
    # batch, inductor's view of that select guards on the batch size being > 1
    py = base_y + off[..., 0::2]  # [B, Ho, Wo, 4]
    px = base_x + off[..., 1::2]
    y0 = torch.floor(py)
    x0 = torch.floor(px)
    ly = py - y0
    lx = px - x0
    hy = 1.0 - ly
    hx = 1.0 - lx
    y0i = y0.long()
    x0i = x0.long()
    batch_base = (torch.arange(B, device=dev) * (H * W)).view(B, 1, 1, 1)
    out: list[tuple[int, int, Tensor, Tensor, Tensor, Tensor]] = []
    for corner in range(4):
        dy, dx = corner // 2, corner % 2  # (0, 0), (0, 1), (1, 0), (1, 1)
        yy = y0i + dy
        xx = x0i + dx
        valid = (yy >= 0) & (yy < H) & (xx >= 0) & (xx < W)
        idx = yy.clamp(0, H - 1) * W + xx.clamp(0, W - 1) + batch_base
        out.append((dy, dx, idx, ly if dy == 1 else hy, lx if dx == 1 else hx, valid))
    return out


def _bilinear_taps_nhwc(x: Tensor, offset: Tensor) -> Tensor:
    """Bilinear samples of the four 2×2 taps of every output (differentiable by autograd).

    One ``embedding_bag`` (sum mode, per-sample weights) gathers the four corners of every tap
    from the channels-last rows of ``x`` and weights and sums them in a single pass: no
    corner-sized intermediate tensors (out-of-map corners get weight 0 at a clamped row).

    Args:
        x: ``[B, H, W, C]`` input map (any floating dtype).
        offset: ``[B, Ho, Wo, 8]`` offsets ``[Δy₀, Δx₀, …, Δy₃, Δx₃]`` in pixels.

    Returns:
        ``[B, Ho, Wo, 4·C]``, tap-major (column ``k·C + c``), in ``x``'s dtype.
    """
    B, H, W, C = x.shape[0], x.shape[1], x.shape[2], x.shape[3]
    Ho, Wo = offset.shape[1], offset.shape[2]
    corners = _corners(offset, H, W)
    idx = torch.stack([c[2] for c in corners], dim=-1).reshape(-1, 4)
    wts = torch.stack([c[3] * c[4] * c[5] for c in corners], dim=-1).to(x.dtype).reshape(-1, 4)
    out = F.embedding_bag(idx, x.reshape(B * H * W, C), per_sample_weights=wts, mode="sum")
    return out.reshape(B, Ho, Wo, 4 * C)


def _tap_major(weight: Tensor) -> Tensor:
    """``[C_out, C, 2, 2]`` → ``[C_out, 4·C]`` with column ``k·C + c`` (``k = 2i + j``)."""
    return weight.permute(0, 2, 3, 1).reshape(weight.shape[0], 4 * weight.shape[1])


class _DeformMerge2x2(torch.autograd.Function):
    """The fast DTM op with a recomputing backward.

    Forward = :func:`_bilinear_taps_nhwc` + one GEMM, exactly the plain-autograd path (so the
    output is bit-identical, autocast included). Plain autograd would keep the four gathered
    corner tensors and the tap matrix (each input-sized) plus the coordinate tensors for the
    backward; this keeps only ``x``, ``offset`` and ``weight`` and recomputes the coordinates
    and gathers in the backward (like activation checkpointing of this one op). The backward is
    written with differentiable ops, so double backward works too.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, offset: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        out = F.linear(_bilinear_taps_nhwc(x, offset), _tap_major(weight), bias)
        ctx.save_for_backward(x, offset, weight)
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return out

    @staticmethod
    def backward(
        ctx: Any, grad_out: Tensor
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
        x, offset, weight = ctx.saved_tensors
        need_x, need_off, need_w, need_b = ctx.needs_input_grad
        B, H, W, C = x.shape
        Ho, Wo, C_out = grad_out.shape[1], grad_out.shape[2], grad_out.shape[3]
        # The forward GEMM ran in grad_out's dtype (the autocast dtype under autocast).
        g = grad_out.reshape(-1, C_out)
        grad_b = g.sum(0).to(ctx.bias_dtype) if need_b and ctx.bias_dtype is not None else None
        grad_cols: Tensor | None = None
        if need_x or need_off:
            grad_cols = (g @ _tap_major(weight).to(g.dtype)).to(x.dtype).view(B, Ho, Wo, 4, C)
        flat = x.reshape(B * H * W, C)
        # x's gradient is accumulated in at least fp32 (it sums up to 16 contributions / pixel)
        acc_dtype = torch.promote_types(x.dtype, torch.float32)
        grad_flat = x.new_zeros(B * H * W, C, dtype=acc_dtype) if need_x else None
        grad_py: Tensor | int = 0
        grad_px: Tensor | int = 0
        for dy, dx, idx, wy, wx, valid in _corners(offset, H, W):
            wk = (wy * wx * valid).to(x.dtype).unsqueeze(-1)
            rows = idx.reshape(-1)
            if grad_flat is not None and grad_cols is not None:
                grad_flat.index_add_(0, rows, (grad_cols * wk).reshape(-1, C).to(acc_dtype))
            if need_off and grad_cols is not None:
                vals = flat.index_select(0, rows).view(B, Ho, Wo, 4, C)
                # d(sample)/d(py) = Σ_corners x·(±1)·wx·valid (sign: + for the lower row)
                dot = (grad_cols * vals).sum(-1).to(wy.dtype) * valid
                grad_py = grad_py + (dot * wx if dy else -dot * wx)
                grad_px = grad_px + (dot * wy if dx else -dot * wy)
        grad_x = grad_flat.to(x.dtype).view(B, H, W, C) if grad_flat is not None else None
        grad_w = None
        if need_w:  # rebuild the tap matrix exactly as the forward did
            cols = _bilinear_taps_nhwc(x, offset)
            gw = g.t() @ cols.reshape(-1, 4 * C).to(g.dtype)  # [C_out, 4C], column k·C + c
            grad_w = gw.view(C_out, 2, 2, C).permute(0, 3, 1, 2).to(weight.dtype)
        grad_off = None
        if need_off and isinstance(grad_py, Tensor) and isinstance(grad_px, Tensor):
            grad_off = torch.stack((grad_py, grad_px), dim=-1).reshape(B, Ho, Wo, 8)
            grad_off = grad_off.to(offset.dtype)
        return grad_x, grad_off, grad_w, grad_b


def deform_merge_2x2_nhwc(
    x: Tensor,
    offset: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    recompute: bool = True,
) -> Tensor:
    """Fast 2×2 stride-2 deformable convolution on channels-last maps.

    Args:
        x: ``[B, H, W, C]``.
        offset: ``[B, Ho, Wo, 8]`` with ``Ho = ⌊H/2⌋``, ``Wo = ⌊W/2⌋``; channels
            ``[Δy₀, Δx₀, …, Δy₃, Δx₃]``, tap ``k = 2i + j``.
        weight: ``[C_out, C, 2, 2]`` (the ``deform_conv2d`` / ``Conv2d`` layout).
        bias: ``[C_out]`` or ``None``.
        recompute: ``True`` (default): a custom autograd function that saves only ``x``,
            ``offset`` and ``weight`` for the backward and recomputes the bilinear gathers
            there; ``False``: plain autograd, which also keeps the four gathered corner
            tensors and the tap matrix (five input-sized tensors) but skips the re-gather.
            Same forward result either way.

    Returns:
        ``[B, Ho, Wo, C_out]``.
    """
    B, H, W, C = x.shape[0], x.shape[1], x.shape[2], x.shape[3]
    Ho, Wo = H // 2, W // 2
    if list(weight.shape[1:]) != [C, 2, 2]:
        raise ValueError(f"weight must be [C_out, {C}, 2, 2], got {weight.shape}")
    if list(offset.shape) != [B, Ho, Wo, 8]:
        raise ValueError(f"offset must be [{B}, {Ho}, {Wo}, 8] for x {x.shape}, got {offset.shape}")
    if bias is not None and list(bias.shape) != [weight.shape[0]]:
        raise ValueError(f"bias must be [{weight.shape[0]}], got {bias.shape}")
    if recompute and not torch.jit.is_scripting():
        out: Tensor = _DeformMerge2x2.apply(x, offset, weight, bias)
        return out
    return F.linear(_bilinear_taps_nhwc(x, offset), _tap_major(weight), bias)


def deform_merge_2x2(
    x: Tensor,
    offset: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    recompute: bool = True,
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
        recompute: recomputing backward (default) or plain autograd, see
            :func:`deform_merge_2x2_nhwc`.

    Returns:
        ``[B, C_out, Ho, Wo]`` (channels-last memory format).
    """
    if x.dim() != 4 or offset.dim() != 4 or weight.dim() != 4:
        raise ValueError("x, offset and weight must be 4-D ([B,C,H,W], [B,8,Ho,Wo], [O,C,2,2])")
    out = deform_merge_2x2_nhwc(
        x.permute(0, 2, 3, 1), offset.permute(0, 2, 3, 1), weight, bias, recompute=recompute
    )
    return out.permute(0, 3, 1, 2)


def _compute_dtype(x: Tensor) -> torch.dtype:
    dev = x.device.type
    if torch.amp.is_autocast_available(dev) and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


@torch.jit.unused
def measured_dtm_path(conv: "DeformConv2x2", x: Tensor, offset: Tensor, repeats: int = 3) -> str:
    """The fastest correct path of ``conv`` for ``x``'s device and compute dtype.

    Measured on the first eager call for a ``(device, dtype, C_in, C_out)`` key (best of
    ``repeats`` timed runs of each path after one warm-up, no autograd) and cached in
    :data:`DTM_PATH_CACHE`; a path that raises (e.g. torchvision without a kernel for the
    dtype) is not a candidate. Under ``torch.compile`` or FX tracing an uncached key gives
    ``"fast"`` (nothing is timed while tracing), as does a call under a ``TorchDispatchMode``
    (e.g. the FLOP counter) or on the meta device.
    """
    key = (x.device.type, _compute_dtype(x), conv.in_channels, conv.out_channels)
    hit = DTM_PATH_CACHE.get(key)
    if hit is not None:
        return hit
    if torch.compiler.is_compiling() or torch.fx._symbolic_trace.is_fx_symbolic_tracing():
        return "fast"
    if _get_current_dispatch_mode() is not None or x.device.type == "meta":
        return "fast"  # e.g. under the FLOP counter: nothing is timed (or counted twice)
    sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)
    times: dict[str, float] = {}
    with torch.no_grad():
        for path in ("fast", "torchvision"):
            try:
                conv.run_path(path, x, offset)
            except (RuntimeError, NotImplementedError):
                continue
            best = float("inf")
            for _ in range(repeats):
                sync()
                t0 = time.perf_counter()
                conv.run_path(path, x, offset)
                sync()
                best = min(best, time.perf_counter() - t0)
            times[path] = best
    choice = min(times, key=times.__getitem__) if times else "fast"
    DTM_PATH_CACHE[key] = choice
    return choice


class DeformConv2x2(nn.Module):
    """2×2 stride-2 deformable convolution with its own zero-initialised offset predictor.

    Parameter names follow the official LIT/LITv2 checkpoints: ``weight``, ``bias`` and
    ``conv_offset.{weight,bias}``.

    Args:
        in_channels: input channels ``C``.
        out_channels: output channels ``C_out``.
        path: ``"auto"`` (the measured fastest correct path, :func:`measured_dtm_path`),
            ``"fast"`` (:func:`deform_merge_2x2`) or ``"torchvision"`` (reference).
        recompute: fast path only: recompute the bilinear gathers in the backward (default,
            saves only the input, offsets and weight) or keep them (plain autograd, ~5
            input-sized tensors more, no re-gather).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        path: str = "auto",
        *,
        recompute: bool = True,
    ) -> None:
        super().__init__()
        if path not in _PATHS:
            raise ValueError(f"path must be one of {_PATHS}, got {path!r}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.path: str = path
        self.recompute = recompute
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

    def run_path(self, path: str, x: Tensor, offset: Tensor) -> Tensor:
        """The deformable conv by ``path`` (``"fast"``/``"torchvision"``).

        Args:
            x: ``[B, H, W, C]``.
            offset: ``[B, 8, Ho, Wo]`` (the offset conv's output).

        Returns:
            ``[B, Ho, Wo, C_out]``.
        """
        if path == "fast":
            return deform_merge_2x2_nhwc(
                x, offset.permute(0, 2, 3, 1), self.weight, self.bias, recompute=self.recompute
            )
        out = deform_conv2d(
            x.permute(0, 3, 1, 2).contiguous(), offset.contiguous(), self.weight, self.bias,
            stride=(2, 2),
        )  # fmt: skip
        return out.permute(0, 2, 3, 1)

    @torch.jit.unused
    def _compile_fast(self) -> bool:
        return (
            torch.compiler.is_compiling()
            and self.path != "torchvision"
            and plain_modules(self.conv_offset)
        )

    def _offset_nhwc(self, x: Tensor) -> Tensor:
        """``conv_offset`` as a GEMM over the 2×2 patches: ``[B, H, W, C]`` → ``[B, Ho, Wo, 8]``.

        Used under ``torch.compile``: equal to the strided conv (to float rounding), but with
        no ``aten.convolution`` on a channels-last input in the graph, whose memory-format
        check would add a guard ``batch >= 2`` to a dynamic-batch graph.
        """
        B, C = x.shape[0], x.shape[3]
        Ho, Wo = x.shape[1] // 2, x.shape[2] // 2
        patches = x[:, : 2 * Ho, : 2 * Wo].reshape(B, Ho, 2, Wo, 2, C).transpose(2, 3)
        patches = patches.reshape(B, Ho, Wo, 4 * C)  # column (2i + j)·C + c: tap-major
        return F.linear(patches, _tap_major(self.conv_offset.weight), self.conv_offset.bias)

    def forward(self, x: Tensor) -> Tensor:
        """Args:
            x: ``[B, H, W, C]`` channels-last map.

        Returns:
            ``[B, ⌊H/2⌋, ⌊W/2⌋, C_out]``.
        """
        if not torch.jit.is_scripting() and self._compile_fast():
            # "auto" compiles the fast path (pure PyTorch ops that inductor fuses); reading the
            # measurement cache here would make every later measurement a recompile
            off = self._offset_nhwc(x)
            return deform_merge_2x2_nhwc(x, off, self.weight, self.bias, self.recompute)
        offset = self.conv_offset(x.permute(0, 3, 1, 2))  # a channels-last view, no copy
        path = self.path
        if torch.jit.is_scripting():
            path = "fast" if path == "auto" else path
        else:
            if path == "auto":
                path = measured_dtm_path(self, x, offset)
        return self.run_path(path, x, offset)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size=2, stride=2, path={self.path}"


@register_notrace_module  # shape checks: an FX leaf
class DeformableTokenMerging(nn.Module):
    """DTM: deformable 2×2/s2 conv → BatchNorm2d → GELU, on tokens.

    State-dict names match the official code: ``dconv.weight``, ``dconv.bias``,
    ``dconv.conv_offset.{weight,bias}``, ``norm_layer.*`` (BatchNorm2d).

    Args:
        dim: input channels ``C``.
        out_dim: output channels (``2C`` between LIT/LITv2 stages).
        path: ``"auto"`` (default: measured fastest), ``"fast"`` or ``"torchvision"`` reference.
        recompute: fast path: recomputing backward (default) or plain autograd, see
            :class:`DeformConv2x2`.
    """

    def __init__(
        self, dim: int, out_dim: int, path: str = "auto", *, recompute: bool = True
    ) -> None:
        super().__init__()
        self.dconv = DeformConv2x2(dim, out_dim, path=path, recompute=recompute)
        self.norm_layer = nn.BatchNorm2d(out_dim)
        self.act = nn.GELU()

    __jit_unused_properties__ = ["path"]  # noqa: RUF012 (TorchScript reads this list)

    @property
    def path(self) -> str:
        """The deformable-conv path in use."""
        return self.dconv.path

    @path.setter
    def path(self, value: str) -> None:
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
        B, N, C = x.shape[0], x.shape[1], x.shape[2]
        H, W = hw[0], hw[1]
        if N != H * W:
            raise ValueError(f"got {N} tokens for a {H}x{W} map")
        if H < 2 or W < 2:
            raise ValueError(f"DTM needs a map of at least 2x2, got {H}x{W}")
        y = self.dconv(x.reshape(B, H, W, C))  # [B, Ho, Wo, C_out]
        y = self.norm_layer(y.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        y = self.act(y)
        Ho, Wo = y.shape[1], y.shape[2]
        return y.reshape(B, Ho * Wo, y.shape[3]), (Ho, Wo)
