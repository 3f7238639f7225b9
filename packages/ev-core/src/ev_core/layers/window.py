"""Local window attention (Swin-style), with padding of non-divisible maps and optional shift.

Functional helpers :func:`window_partition` / :func:`window_reverse` follow Swin's layout
(``[B, H, W, C]`` ↔ ``[B·nW, M, M, C]``); :func:`window_attention_mask` builds the per-window
key mask for shifted windows and padded tokens; :class:`WindowAttention` is the module
(``forward(x: [B, N, C], hw) -> [B, N, C]``).

Padding: a map whose ``H`` or ``W`` is not a multiple of ``M`` is zero-padded at the
bottom/right, attended, and cropped back. With ``mask_padding=True`` (default) the padded
tokens are **masked out as keys**, so every real token attends exactly to the real tokens of its
(possibly clipped) window and the result does not depend on the padding. ``mask_padding=False``
reproduces the official Swin/LIT detection backbones, where the zero tokens take part as keys
(their keys and values are the qkv bias).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ev_core.layers.attention import attention, check_tokens, settle_backend

__all__ = [
    "WindowAttention",
    "relative_position_index",
    "window_attention_mask",
    "window_partition",
    "window_reverse",
]


def _pair(window_size: int | tuple[int, int]) -> tuple[int, int]:
    wh, ww = (window_size, window_size) if isinstance(window_size, int) else window_size
    if wh <= 0 or ww <= 0:
        raise ValueError(f"window size must be positive, got {window_size!r}")
    return int(wh), int(ww)


def window_partition(x: Tensor, window_size: int | tuple[int, int]) -> Tensor:
    """Split a map into non-overlapping windows (row-major over windows).

    Args:
        x: ``[B, H, W, C]`` with ``H``, ``W`` multiples of the window size.
        window_size: ``M`` or ``(Mh, Mw)``.

    Returns:
        ``[B·nW, Mh, Mw, C]`` with ``nW = (H/Mh)·(W/Mw)``.
    """
    wh, ww = _pair(window_size)
    B, H, W, C = x.shape
    if H % wh or W % ww:
        raise ValueError(f"map {H}x{W} is not divisible by the window {wh}x{ww}; pad it first")
    x = x.view(B, H // wh, wh, W // ww, ww, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, wh, ww, C)


def window_reverse(windows: Tensor, window_size: int | tuple[int, int], H: int, W: int) -> Tensor:
    """Inverse of :func:`window_partition`.

    Args:
        windows: ``[B·nW, Mh, Mw, C]``.
        window_size: ``M`` or ``(Mh, Mw)``.
        H: map height (multiple of ``Mh``).
        W: map width (multiple of ``Mw``).

    Returns:
        ``[B, H, W, C]``.
    """
    wh, ww = _pair(window_size)
    if H % wh or W % ww:
        raise ValueError(f"map {H}x{W} is not divisible by the window {wh}x{ww}")
    nh, nw = H // wh, W // ww
    C = windows.shape[-1]
    x = windows.view(-1, nh, nw, wh, ww, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, H, W, C)


def relative_position_index(window_size: int | tuple[int, int]) -> Tensor:
    """Swin's index into a ``(2Mh−1)(2Mw−1)`` bias table for every pair of window tokens.

    Returns:
        ``[Mh·Mw, Mh·Mw]`` long, entry ``(i, j)`` =
        ``(ri − rj + Mh − 1)·(2Mw − 1) + (ci − cj + Mw − 1)``.
    """
    wh, ww = _pair(window_size)
    rows, cols = torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij")
    coords = torch.stack([rows.flatten(), cols.flatten()])  # [2, M²]
    rel = coords[:, :, None] - coords[:, None, :]  # [2, M², M²]
    return (rel[0] + wh - 1) * (2 * ww - 1) + (rel[1] + ww - 1)


def window_attention_mask(
    hw: tuple[int, int],
    window_size: int | tuple[int, int],
    shift_size: int | tuple[int, int] = 0,
    *,
    mask_padding: bool = True,
    device: torch.device | str | None = None,
) -> Tensor | None:
    """Which keys each query may attend to, per window of the padded (and rolled) map.

    Tokens ``i``, ``j`` of one window may attend when they come from the same region of the
    shifted partition (Swin: tokens that wrapped around the roll are kept apart) and ``j`` is a
    real token (when ``mask_padding``). The diagonal is always allowed, so a padded query row is
    never empty (its output is cropped anyway).

    Args:
        hw: unpadded map size ``(H, W)``.
        window_size: ``M`` or ``(Mh, Mw)``.
        shift_size: cyclic shift ``s`` or ``(sh, sw)`` (0 = none), ``0 <= s < M``.
        mask_padding: mask padded tokens as keys.
        device: device of the mask.

    Returns:
        ``[nW, Mh·Mw, Mh·Mw]`` bool (``True`` = attend), or ``None`` when nothing is masked.
    """
    wh, ww = _pair(window_size)
    sh, sw = (shift_size, shift_size) if isinstance(shift_size, int) else shift_size
    H, W = hw
    Hp, Wp = -(-H // wh) * wh, -(-W // ww) * ww
    padded = (Hp, Wp) != (H, W)
    if sh == 0 and sw == 0 and not (padded and mask_padding):
        return None
    rows = torch.arange(Hp, device=device)
    cols = torch.arange(Wp, device=device)
    # region id in the *rolled* frame: Swin's three slices per axis when shifted (the last
    # window row/column holds tokens that wrapped around and must not see each other)
    row_region = (rows >= Hp - wh).long() + (rows >= Hp - sh).long() if sh else rows * 0
    col_region = (cols >= Wp - ww).long() + (cols >= Wp - sw).long() if sw else cols * 0
    region = row_region[:, None] * 3 + col_region[None, :]  # [Hp, Wp]
    valid = (rows[:, None] < H) & (cols[None, :] < W)
    if not mask_padding:
        valid = torch.ones_like(valid)
    if sh or sw:  # validity is known in the original frame: roll it like the tokens
        valid = torch.roll(valid, shifts=(-sh, -sw), dims=(0, 1))
    region_w = window_partition(region[None, :, :, None], (wh, ww)).flatten(1)  # [nW, M²]
    valid_w = window_partition(valid[None, :, :, None], (wh, ww)).flatten(1)
    allowed = (region_w[:, :, None] == region_w[:, None, :]) & valid_w[:, None, :]
    eye = torch.eye(wh * ww, dtype=torch.bool, device=allowed.device)
    return allowed | eye


class WindowAttention(nn.Module):
    """Multi-head self-attention inside non-overlapping ``M×M`` windows, O(N·M²·C).

    Parameter names (``qkv``, ``proj``, ``relative_position_bias_table``) follow Swin/timm.

    Args:
        dim: channels ``C``.
        num_heads: heads ``h`` (``C`` divisible by ``h``).
        window_size: ``M`` (default 7) or ``(Mh, Mw)``.
        shift_size: Swin cyclic shift (``0`` = none; Swin uses ``M // 2`` every other block).
        qkv_bias: bias on the qkv projection.
        qk_scale: logit scale override (default ``d ** -0.5``).
        attn_drop: attention dropout.
        proj_drop: output dropout.
        rel_pos_bias: learn a ``(2Mh−1)(2Mw−1) × h`` relative position bias table.
        mask_padding: mask zero-padded tokens out as keys (see the module docstring).
        backend: attention backend (:func:`~ev_core.layers.attention.settle_backend`), settled
            at construction.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        window_size: int | tuple[int, int] = 7,
        shift_size: int | tuple[int, int] = 0,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        rel_pos_bias: bool = False,
        mask_padding: bool = True,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        if num_heads <= 0 or dim % num_heads != 0:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.window_size = _pair(window_size)
        shift = (shift_size, shift_size) if isinstance(shift_size, int) else tuple(shift_size)
        if len(shift) != 2 or not all(0 <= s < m for s, m in zip(shift, self.window_size)):
            raise ValueError(
                f"shift_size {shift_size!r} must satisfy 0 <= shift < window {self.window_size}"
            )
        self.shift_size: tuple[int, int] = (int(shift[0]), int(shift[1]))
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = qk_scale if qk_scale is not None else self.head_dim**-0.5
        self.mask_padding = mask_padding
        self.backend: str = settle_backend(backend)
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.relative_position_bias_table: nn.Parameter | None
        if rel_pos_bias:
            wh, ww = self.window_size
            table = torch.empty((2 * wh - 1) * (2 * ww - 1), num_heads)
            self.relative_position_bias_table = nn.Parameter(nn.init.trunc_normal_(table, std=0.02))
            self.register_buffer(
                "relative_position_index",
                relative_position_index(self.window_size),
                persistent=False,
            )
        else:
            self.relative_position_bias_table = None

    def _bias(self, H: int, W: int, device: torch.device) -> Tensor | None:
        """Logits bias ``[nW, h, M², M²]`` (float) or mask ``[nW, 1, M², M²]`` (bool), or None."""
        mask = window_attention_mask(
            (H, W), self.window_size, self.shift_size, mask_padding=self.mask_padding, device=device
        )
        table = self.relative_position_bias_table
        if table is None:
            return None if mask is None else mask[:, None]
        n = self.window_size[0] * self.window_size[1]
        index: Tensor = self.relative_position_index  # type: ignore[assignment]
        rel = table[index.view(-1)].view(n, n, -1).permute(2, 0, 1)
        if mask is None:
            return rel[None]
        neg_inf = torch.full((), float("-inf"), dtype=rel.dtype, device=device)
        return rel[None] + torch.where(mask, 0.0, neg_inf)[:, None].to(rel.dtype)

    def forward(self, x: Tensor, hw: tuple[int, int]) -> Tensor:
        """Args:
            x: ``[B, N, C]`` row-major over the ``H × W`` map.
            hw: ``(H, W)``; any size (padded to multiples of ``M`` internally).

        Returns:
            ``[B, N, C]``.
        """
        B, N, C, H, W = check_tokens(x, hw)
        if self.dim != C:
            raise ValueError(f"expected {self.dim} channels, got {C}")
        wh, ww = self.window_size
        sh, sw = self.shift_size
        h, d = self.num_heads, self.head_dim
        pad_b, pad_r = (-H) % wh, (-W) % ww
        xm = x.view(B, H, W, C)
        if pad_b or pad_r:
            xm = F.pad(xm, (0, 0, 0, pad_r, 0, pad_b))
        Hp, Wp = H + pad_b, W + pad_r
        if sh or sw:
            xm = torch.roll(xm, shifts=(-sh, -sw), dims=(1, 2))
        nw, n = (Hp // wh) * (Wp // ww), wh * ww
        windows = window_partition(xm, self.window_size).view(B, nw, n, C)
        # windows fold into the head axis: q, k, v [B, nW·h, M², d] stay 4-D for fused kernels
        qkv = self.qkv(windows).view(B, nw, n, 3, h, d).permute(3, 0, 1, 4, 2, 5)
        q, k, v = qkv.reshape(3, B, nw * h, n, d).unbind(0)
        bias = self._bias(H, W, x.device)
        if bias is not None:
            bias = bias.expand(nw, h, n, n).reshape(1, nw * h, n, n)
        dropout_p = self.attn_drop if self.training else 0.0
        out = attention(q, k, v, bias, self.scale, dropout_p, self.backend)
        out = out.view(B, nw, h, n, d).transpose(2, 3).reshape(B * nw, wh, ww, C)
        xm = window_reverse(out, self.window_size, Hp, Wp)
        if sh or sw:
            xm = torch.roll(xm, shifts=(sh, sw), dims=(1, 2))
        if pad_b or pad_r:
            xm = xm[:, :H, :W]
        return self.proj_drop(self.proj(xm.reshape(B, N, C)))

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_heads={self.num_heads}, window_size={self.window_size}, "
            f"shift_size={self.shift_size}, rel_pos_bias="
            f"{self.relative_position_bias_table is not None}, mask_padding={self.mask_padding}"
        )
