"""Global self-attention with a Swin-style relative-position bias over the whole map (LIT-S/M/B).

LIT-S/M/B attend globally inside a stage, with one learned bias per head and relative offset
``(Δy, Δx)`` of the **whole** stage map: a table of ``(2H−1)(2W−1) × h`` entries (729 × h at
14×14), gathered through a fixed ``relative_position_index [N, N]`` buffer. The layer is thus
resolution-locked; a different map size raises an error.

Note: a float bias rules out the flash SDPA kernel (efficient/math kernels take it).
"""

from __future__ import annotations

import torch
from timm.layers import register_notrace_module
from torch import Tensor, nn

from ev_core.layers.attention import MultiHeadSelfAttention

__all__ = ["RelPosAttention", "relative_position_index"]


def relative_position_index(hw: tuple[int, int]) -> Tensor:
    """Index of every (query, key) pair of an ``H × W`` map into a ``(2H−1)(2W−1)`` table.

    Args:
        hw: ``(H, W)``.

    Returns:
        ``[H·W, H·W]`` int64: ``(Δy + H − 1)·(2W − 1) + (Δx + W − 1)`` with ``Δ = query − key``.
    """
    H, W = hw
    ys, xs = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    dy = ys[:, None] - ys[None, :] + (H - 1)
    dx = xs[:, None] - xs[None, :] + (W - 1)
    return dy * (2 * W - 1) + dx


@register_notrace_module  # resolution checks: an FX leaf
class RelPosAttention(MultiHeadSelfAttention):
    """Global MSA plus a learned relative-position bias over a fixed ``H × W`` map.

    State-dict names match the official LIT checkpoints: ``qkv``, ``proj``,
    ``relative_position_bias_table [(2H−1)(2W−1), h]`` and the (persistent) buffer
    ``relative_position_index [N, N]``.

    Args:
        dim: channels ``C``.
        resolution: the stage map ``(H, W)`` this layer is built for.
        num_heads: heads ``h``.
        qkv_bias: bias on the qkv projection.
        qk_scale: logit scale override (default ``d ** -0.5``).
        attn_drop: attention dropout.
        proj_drop: output dropout.
        backend: attention backend (:func:`~ev_core.layers.attention.settle_backend`), settled
            at construction.
    """

    def __init__(
        self,
        dim: int,
        resolution: tuple[int, int],
        num_heads: int = 8,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        backend: str | None = None,
    ) -> None:
        super().__init__(dim, num_heads, qkv_bias, qk_scale, attn_drop, proj_drop, backend)
        H, W = resolution
        self.resolution = (int(H), int(W))
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * H - 1) * (2 * W - 1), num_heads)
        )
        self.register_buffer("relative_position_index", relative_position_index((H, W)))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def position_bias(self) -> Tensor:
        """The bias ``[h, N, N]`` (in the table's dtype)."""
        n = self.resolution[0] * self.resolution[1]
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]  # type: ignore[operator]
        return bias.view(n, n, -1).permute(2, 0, 1)

    def forward(
        self, x: Tensor, hw: tuple[int, int] | None = None, bias: Tensor | None = None
    ) -> Tensor:
        """Args:
            x: ``[B, N, C]`` tokens of the ``resolution`` map.
            hw: ``(H, W)``; must equal ``resolution`` (checked when given).
            bias: an extra additive logits bias (e.g. a mask), added to the position bias.

        Returns:
            ``[B, N, C]``.
        """
        rh, rw = self.resolution
        if x.shape[1] != rh * rw or (hw is not None and (hw[0] != rh or hw[1] != rw)):
            raise ValueError(
                f"relative-position attention is built for a {rh}x{rw} map, got {x.shape[1]} "
                f"tokens (hw={hw}); LIT-S/M/B are resolution-locked: build the model with the "
                "matching img_size"
            )
        pos = self.position_bias().to(_compute_dtype(x)).unsqueeze(0)
        return self.forward_tokens(x, pos if bias is None else pos + bias)


def _compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype attention logits are computed in: autocast's where it is on, else ``x``'s."""
    if torch.jit.is_scripting():
        return x.dtype
    else:
        dev = x.device.type  # autocast has no state for e.g. the meta device
        if torch.amp.is_autocast_available(dev) and torch.is_autocast_enabled(dev):
            return torch.get_autocast_dtype(dev)
        return x.dtype
