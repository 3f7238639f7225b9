"""Spatio-temporal attention for STPT, built on ev-core's attention family.

* Global spatio-temporal attention is :class:`ev_core.layers.MultiHeadSelfAttention` over all
  ``T·H·W`` tokens.
* :class:`WindowAttention3D` *is* that module applied inside non-overlapping
  ``(wt, wh, ww)`` windows: tokens are partitioned into windows (zero-padded to a multiple of
  the window, the padding masked out of the keys), attended per window through the same
  ``qkv``/``proj`` and :func:`ev_core.layers.attend` backends, then merged back. When one
  window covers the whole clip it computes exactly global attention (tested).

Tokens are ``x: [B, N, C]`` in row-major ``(T, H, W)`` order with ``thw = (T, H, W)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ev_core.layers import MultiHeadSelfAttention

__all__ = ["WindowAttention3D", "window_partition_3d", "window_reverse_3d"]


def window_partition_3d(x: Tensor, window: tuple[int, int, int]) -> Tensor:
    """``[B, T, H, W, C]`` (each dim divisible by the window) → ``[B·nW, wt·wh·ww, C]``."""
    B, T, H, W, C = x.shape
    wt, wh, ww = window
    x = x.view(B, T // wt, wt, H // wh, wh, W // ww, ww, C)
    return x.permute(0, 1, 3, 5, 2, 4, 6, 7).reshape(-1, wt * wh * ww, C)


def window_reverse_3d(
    windows: Tensor, window: tuple[int, int, int], thw: tuple[int, int, int], batch: int
) -> Tensor:
    """Inverse of :func:`window_partition_3d`: → ``[B, T, H, W, C]``."""
    T, H, W = thw
    wt, wh, ww = window
    C = windows.shape[-1]
    x = windows.view(batch, T // wt, H // wh, W // ww, wt, wh, ww, C)
    return x.permute(0, 1, 4, 2, 5, 3, 6, 7).reshape(batch, T, H, W, C)


class WindowAttention3D(MultiHeadSelfAttention):
    """Local spatio-temporal window attention (MSA inside ``(wt, wh, ww)`` windows).

    Args:
        dim: channels.
        num_heads: heads.
        window_size: ``(wt, wh, ww)``; each is clamped to the input's extent at run time.
        qkv_bias: bias on the qkv projection.
        attn_drop: attention dropout.
        proj_drop: output dropout.
        backend: ev-core attention backend (``None`` = default).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: tuple[int, int, int],
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        backend: str | None = None,
    ) -> None:
        super().__init__(
            dim,
            num_heads,
            qkv_bias=qkv_bias,
            attn_drop=attn_drop,
            proj_drop=proj_drop,
            backend=backend,
        )
        if len(window_size) != 3 or any(int(w) <= 0 for w in window_size):
            raise ValueError(f"window_size must be three positive ints, got {window_size}")
        self.window_size = tuple(int(w) for w in window_size)

    def effective_window(self, thw: tuple[int, int, int]) -> tuple[int, int, int]:
        """The window clamped to the input extent ``(T, H, W)``."""
        return tuple(min(w, s) for w, s in zip(self.window_size, thw, strict=True))  # type: ignore[return-value]

    def forward(self, x: Tensor, thw: tuple[int, int, int]) -> Tensor:  # type: ignore[override]
        """Args:
            x: ``[B, T·H·W, C]``.
            thw: ``(T, H, W)``.

        Returns:
            ``[B, T·H·W, C]``.
        """
        B, N, C = x.shape
        T, H, W = thw
        if N != T * H * W:
            raise ValueError(f"token count {N} != T·H·W = {T}·{H}·{W}")
        win = self.effective_window(thw)
        pads = [(-s) % w for s, w in zip(thw, win, strict=True)]
        grid = x.view(B, T, H, W, C)
        if any(pads):
            grid = F.pad(grid, (0, 0, 0, pads[2], 0, pads[1], 0, pads[0]))
        Tp, Hp, Wp = T + pads[0], H + pads[1], W + pads[2]
        windows = window_partition_3d(grid, win)
        mask = None
        if any(pads):
            valid = torch.zeros(1, Tp, Hp, Wp, 1, dtype=torch.bool, device=x.device)
            valid[:, :T, :H, :W] = True
            keys = window_partition_3d(valid.expand(B, -1, -1, -1, -1), win)[..., 0]  # [B·nW, n]
            mask = keys[:, None, None, :]  # [B·nW, 1, 1, n] -> broadcast over heads and queries
        out = super().forward(windows, None, bias=mask)
        out = window_reverse_3d(out, win, (Tp, Hp, Wp), B)[:, :T, :H, :W]
        return out.reshape(B, N, C)

    def extra_repr(self) -> str:
        return f"window_size={self.window_size}, " + super().extra_repr()
