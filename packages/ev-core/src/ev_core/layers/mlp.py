"""Feed-forward blocks of the LIT family, all with ``forward(x: [B, N, C], hw)``.

* :class:`Mlp` -- ``fc1 → GELU → drop → fc2 → drop`` (LIT).
* :class:`ConvFFN` -- ``fc1 → depth-wise 3×3 conv → GELU → drop → fc2 → drop`` (LITv2); the
  depth-wise conv (zero padding, bias) runs on a channels-last view of the tokens (no copy in,
  one layout-preserving conv), and supplies the position information of LITv2.
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["ConvFFN", "DWConv", "Mlp"]


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

    def forward(self, x: Tensor, hw: tuple[int, int] | None = None) -> Tensor:
        """Args:
            x: ``[B, N, C]``.
            hw: unused (uniform block interface).

        Returns:
            ``[B, N, C_out]``.
        """
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class DWConv(nn.Module):
    """Depth-wise 3×3 conv on tokens; the conv is ``dwconv`` (official name).

    Args:
        dim: channels.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim, bias=True)

    def forward(self, x: Tensor, hw: tuple[int, int]) -> Tensor:
        """Args:
            x: ``[B, H·W, C]``.
            hw: ``(H, W)``.

        Returns:
            ``[B, H·W, C]``.
        """
        B, N, C = x.shape
        H, W = hw
        if N != H * W:
            raise ValueError(f"got {N} tokens for a {H}x{W} map")
        y = self.dwconv(x.reshape(B, H, W, C).permute(0, 3, 1, 2))  # channels-last view
        return y.permute(0, 2, 3, 1).reshape(B, N, C)


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

    def forward(self, x: Tensor, hw: tuple[int, int] | None = None) -> Tensor:
        """Args:
            x: ``[B, H·W, C]``.
            hw: ``(H, W)`` (required: the depth-wise conv needs the map shape).

        Returns:
            ``[B, H·W, C_out]``.
        """
        if hw is None:
            raise ValueError("ConvFFN needs the map size hw=(H, W)")
        x = self.act(self.dwconv(self.fc1(x), hw))
        return self.drop(self.fc2(self.drop(x)))
