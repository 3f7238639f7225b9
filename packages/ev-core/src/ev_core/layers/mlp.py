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
from timm.layers import register_notrace_module
from torch import Tensor, nn

from ev_core.layers.onednn import conv2d_act, fusable, linear_act

__all__ = ["ConvFFN", "DWConv", "Mlp"]


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


@register_notrace_module  # token-count check: an FX leaf
class DWConv(nn.Module):
    """Depth-wise 3×3 conv on tokens; the conv is ``dwconv`` (official name).

    Args:
        dim: channels.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim, bias=True)

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
        if act == "none":
            y = self.dwconv(xc)
        else:
            y = conv2d_act(xc, self.dwconv.weight, self.dwconv.bias, 1, C, act)
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
        x = self.act(self.dwconv(self.fc1(x), hw))
        return self.drop(self.fc2(self.drop(x)))
