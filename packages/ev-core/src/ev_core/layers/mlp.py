"""Feed-forward blocks of the LIT family, all with ``forward(x: [B, N, C], hw)``.

* :class:`Mlp` -- ``fc1 → GELU → drop → fc2 → drop`` (LIT).
* :class:`ConvFFN` -- ``fc1 → depth-wise 3×3 conv → GELU → drop → fc2 → drop`` (LITv2); the
  depth-wise conv (zero padding, bias) runs on a channels-last view of the tokens (no copy in,
  one layout-preserving conv), and supplies the position information of LITv2.

GELU is the exact (erf) one. In CPU inference the biases and GELU are fused into the GEMM /
convolution (:mod:`ev_core.layers.onednn`); both modules are FX leaves so that traced and eager
models run the same kernels.
"""

import torch
import torch.nn.functional as F
from timm.layers import register_notrace_module
from torch import Tensor, nn

from ev_core.layers.onednn import (
    compiled_conv_onednn,
    conv2d_act,
    conv2d_act_traced,
    fusable,
    linear_act,
    plain_modules,
)

__all__ = ["ConvFFN", "DWConv", "Mlp", "depthwise_conv_nhwc"]


@register_notrace_module
class Mlp(nn.Module):
    """Two-layer MLP (``fc1``, ``fc2``), official LIT names.

    Args:
        in_features: input channels.
        hidden_features: hidden channels (default ``in_features``).
        out_features: output channels (default ``in_features``).
        drop: dropout after the activation and after ``fc2``.
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: int | None = None,
        out_features: int | None = None,
        drop: float = 0.0,
    ) -> None:
        super().__init__()
        hidden_features = hidden_features or in_features
        out_features = out_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, out_features)
        self.drop = nn.Dropout(drop)

    @torch.jit.unused
    def _fusable(self, x: Tensor) -> bool:
        return fusable(x, self.fc1, self.act, self.fc2)

    def forward(self, x: Tensor, hw: tuple[int, int] | None = None) -> Tensor:
        """Args:
            x: ``[B, N, C]``.
            hw: unused (uniform block interface).

        Returns:
            ``[B, N, C_out]``.
        """
        if not torch.jit.is_scripting() and self._fusable(x):
            x = self.drop(linear_act(x, self.fc1.weight, self.fc1.bias, "gelu"))
            return self.drop(linear_act(x, self.fc2.weight, self.fc2.bias))
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


def depthwise_conv_nhwc(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """Depth-wise ``k×k`` convolution (stride 1, zero padding ``k // 2``, odd ``k``) of a
    channels-last map as ``k²`` shifted multiply-adds.

    Equals ``F.conv2d(x.permute(0, 3, 1, 2), weight, bias, padding=k // 2, groups=C)`` in NHWC
    (to float rounding). ``DWConv`` runs it under ``torch.compile`` where oneDNN's fused op
    cannot run (gradients on, non-CPU devices, other dtypes): inductor fuses the taps, bias and the following GELU into
    one loop, and the graph holds no ``aten.convolution`` on a channels-last input, whose
    fake-tensor memory-format check adds a guard ``batch >= 2`` (so batch 1 would recompile a
    dynamic-batch graph). On the CPU oneDNN's depth-wise conv was faster (BENCHMARKS.md).

    Args:
        x: ``[B, H, W, C]``.
        weight: ``[C, 1, k, k]``.
        bias: ``[C]`` or ``None``.

    Returns:
        ``[B, H, W, C]``.
    """
    C, k = weight.shape[0], weight.shape[-1]
    if x.shape[-1] != C or weight.shape[1] != 1 or weight.shape[-2] != k or k % 2 != 1:
        raise ValueError(f"expected x [B, H, W, {C}] and an odd square [C, 1, k, k] weight, got "
                         f"{list(x.shape)} and {list(weight.shape)}")  # fmt: skip
    H, W, p = x.shape[1], x.shape[2], k // 2
    xp = F.pad(x, [0, 0, p, p, p, p])
    taps = weight.reshape(C, k * k).t()  # [k², C]
    out = xp[:, :H, :W, :] * taps[0]
    for t in range(1, k * k):
        i, j = t // k, t % k
        out = out + xp[:, i : i + H, j : j + W, :] * taps[t]
    return out if bias is None else out + bias


@register_notrace_module  # token-count check: an FX leaf
class DWConv(nn.Module):
    """Depth-wise 3×3 conv on tokens; the conv is ``dwconv`` (official name).

    Args:
        dim: channels.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim, bias=True)

    @torch.jit.unused
    def _plain(self) -> bool:
        return plain_modules(self.dwconv)

    @torch.jit.unused
    def _compiling_plain(self) -> bool:
        return torch.compiler.is_compiling() and plain_modules(self.dwconv)

    def forward(self, x: Tensor, hw: tuple[int, int], act: str = "none") -> Tensor:
        """Args:
            x: ``[B, H·W, C]``.
            hw: ``(H, W)``.
            act: ``"none"`` or ``"gelu"`` applied to the conv output.

        Returns:
            ``[B, H·W, C]``.
        """
        B, N, C = x.shape[0], x.shape[1], x.shape[2]
        H, W = hw[0], hw[1]
        if N != H * W:
            raise ValueError(f"got {N} tokens for a {H}x{W} map")
        xc = x.reshape(B, H, W, C).permute(0, 3, 1, 2)  # channels-last view, no copy
        if not torch.jit.is_scripting() and self._compiling_plain():
            # no aten.convolution in a compiled graph (its fake-tensor rule guards on
            # batch >= 2): oneDNN's fused op for CPU inference, else the shifted-tap sum
            w, b = self.dwconv.weight, self.dwconv.bias
            if compiled_conv_onednn(x):
                y = conv2d_act_traced(xc, w, b, 1, C, act).permute(0, 2, 3, 1)
            else:
                y = depthwise_conv_nhwc(x.reshape(B, H, W, C), w, b)
                y = F.gelu(y) if act == "gelu" else y
            return y.reshape(B, N, C)
        if act != "none" and not torch.jit.is_scripting() and self._plain():
            y = conv2d_act(xc, self.dwconv.weight, self.dwconv.bias, 1, C, act)
        else:  # the module itself (hooks, replaced convs), then the activation
            y = self.dwconv(xc)
            if act == "gelu":
                y = F.gelu(y)
            elif act != "none":
                raise ValueError("act must be 'none' or 'gelu', got " + act)
        return y.permute(0, 2, 3, 1).reshape(B, N, C)


@register_notrace_module
class ConvFFN(Mlp):
    """LITv2 feed-forward: ``fc1 → DWConv 3×3 → GELU → drop → fc2 → drop``.

    An :class:`Mlp` with a depth-wise conv after ``fc1``. State-dict names: ``fc1``,
    ``dwconv.dwconv``, ``fc2``.

    Args:
        in_features: input channels.
        hidden_features: hidden channels (default ``in_features``).
        out_features: output channels (default ``in_features``).
        drop: dropout after the activation and after ``fc2``.
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: int | None = None,
        out_features: int | None = None,
        drop: float = 0.0,
    ) -> None:
        super().__init__(in_features, hidden_features, out_features, drop)
        self.dwconv = DWConv(self.fc1.out_features)

    @torch.jit.unused
    def _fusable(self, x: Tensor) -> bool:
        return fusable(x, self.fc1, self.dwconv.dwconv, self.act, self.fc2)

    def forward(self, x: Tensor, hw: tuple[int, int] | None = None) -> Tensor:
        """Args:
            x: ``[B, H·W, C]``.
            hw: ``(H, W)`` (required: the depth-wise conv needs the map shape).

        Returns:
            ``[B, H·W, C_out]``.
        """
        if hw is None:
            raise ValueError("ConvFFN needs the map size hw=(H, W)")
        if not torch.jit.is_scripting() and self._fusable(x):
            x = self.dwconv(linear_act(x, self.fc1.weight, self.fc1.bias), hw, "gelu")
            return self.drop(linear_act(self.drop(x), self.fc2.weight, self.fc2.bias))
        if not torch.jit.is_scripting() and self._compiling_plain_act():
            x = self.dwconv(self.fc1(x), hw, "gelu")  # GELU in the conv's epilogue
        else:
            x = self.act(self.dwconv(self.fc1(x), hw))
        return self.drop(self.fc2(self.drop(x)))

    @torch.jit.unused
    def _compiling_plain_act(self) -> bool:
        return torch.compiler.is_compiling() and plain_modules(self.act)
