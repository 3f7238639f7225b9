"""SPViT weight sharing: the MSA's value/output weights seen as bottleneck convolutions.

An MSA with ``h`` heads of width ``d`` has per-head value weights ``W_v^h ∈ R^{d×C}`` (bias
``b_v^h``) and output weights ``W_o^h ∈ R^{C×d}``. A learnable ``head_probs ∈ R^{h×9}`` turns
into a per-tap mixture over heads, ``P = softmax_h(head_probs / T)``, and tap ``p`` of a
``C → d → C`` bottleneck convolution uses

    K_p = Σ_h P[h, p]·W_v^h,    b_p = Σ_h P[h, p]·b_v^h,    O_p = Σ_h P[h, p]·W_o^h.

* **3×3 branch**: ``Conv2d(C→d, 3×3, pad 1)`` with tap ``p`` at the kernel position given by
  ``tap_order`` and bias ``Σ_p b_p`` → BN(d) → ReLU → ``Linear(d→C)`` with weight ``Σ_p O_p``
  and the MSA's output bias.
* **1×1 branch**: the centre tap alone (``K_c``, ``b_c``, ``O_c``).

``tap_order`` (the official code's two trees differ):

* ``"deit"``: tap ``p`` sits at kernel position ``(row, col) = (p % 3, p // 3)`` (column-major),
  centre tap 4.
* ``"swin"``: tap 0 is the centre; taps 1–4 and 5–8 are the column-major positions 0–3 and 5–8.

All functions are differentiable in every weight and in ``head_probs``.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "TAP_ORDERS",
    "TapOrder",
    "bottleneck_conv",
    "centre_tap",
    "conv_kernels",
    "head_mixture",
    "mixed_taps",
    "tap_positions",
]

TapOrder = Literal["deit", "swin"]
TAP_ORDERS: tuple[str, ...] = ("deit", "swin")


def _column_major(q: int) -> tuple[int, int]:
    return q % 3, q // 3


def tap_positions(tap_order: TapOrder) -> list[tuple[int, int]]:
    """Kernel position ``(row, col)`` of each of the 9 taps (columns of ``head_probs``)."""
    if tap_order == "deit":
        return [_column_major(p) for p in range(9)]
    if tap_order == "swin":
        return [_column_major(4)] + [_column_major(q) for q in (0, 1, 2, 3, 5, 6, 7, 8)]
    raise ValueError(f"tap_order must be one of {TAP_ORDERS}, got {tap_order!r}")


def centre_tap(tap_order: TapOrder) -> int:
    """Index of the tap at the kernel centre (4 for ``"deit"``, 0 for ``"swin"``)."""
    return tap_positions(tap_order).index((1, 1))


def head_mixture(head_probs: Tensor, temperature: float) -> Tensor:
    """``softmax over heads of (head_probs / T)``: ``[h, 9] → [h, 9]``, columns sum to 1."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return torch.softmax(head_probs / temperature, dim=0)


def mixed_taps(
    v_weight: Tensor,
    v_bias: Tensor | None,
    proj_weight: Tensor,
    mixture: Tensor,
) -> tuple[Tensor, Tensor | None, Tensor]:
    """Per-tap head mixtures of the value and output weights.

    Args:
        v_weight: ``[h·d, C]`` value projection (rows grouped by head).
        v_bias: ``[h·d]`` value bias or ``None``.
        proj_weight: ``[C_out, h·d]`` output projection.
        mixture: ``[h, T]`` head mixture (``T`` taps).

    Returns:
        ``K [T, d, C]``, ``b [T, d]`` (or ``None``), ``O [T, C_out, d]``.
    """
    h = mixture.shape[0]
    A, C = v_weight.shape
    if A % h != 0 or proj_weight.shape[1] != A:
        raise ValueError(
            f"value weight {tuple(v_weight.shape)} / output weight {tuple(proj_weight.shape)} "
            f"do not split into {h} heads"
        )
    d = A // h
    k = torch.einsum("hp,hdc->pdc", mixture, v_weight.reshape(h, d, C))
    b = None if v_bias is None else torch.einsum("hp,hd->pd", mixture, v_bias.reshape(h, d))
    o = torch.einsum("hp,chd->pcd", mixture, proj_weight.reshape(-1, h, d))
    return k, b, o


def conv_kernels(
    v_weight: Tensor,
    v_bias: Tensor | None,
    proj_weight: Tensor,
    head_probs: Tensor,
    temperature: float,
    kernel_size: int,
    tap_order: TapOrder = "deit",
) -> tuple[Tensor, Tensor | None, Tensor]:
    """The bottleneck convolution shared with an MSA.

    Args:
        v_weight: ``[h·d, C]`` value projection.
        v_bias: ``[h·d]`` or ``None``.
        proj_weight: ``[C_out, h·d]`` output projection.
        head_probs: ``[h, 9]`` learnable head scores.
        temperature: softmax temperature ``T``.
        kernel_size: 3 (all taps) or 1 (the centre tap).
        tap_order: ``"deit"`` or ``"swin"`` (see the module docstring).

    Returns:
        ``weight [d, C, k, k]``, ``bias [d]`` (or ``None``), ``out_weight [C_out, d]``.
    """
    positions = tap_positions(tap_order)
    k, b, o = mixed_taps(v_weight, v_bias, proj_weight, head_mixture(head_probs, temperature))
    if kernel_size == 1:
        c = positions.index((1, 1))
        return k[c][:, :, None, None], (None if b is None else b[c]), o[c]
    if kernel_size != 3:
        raise ValueError(f"kernel_size must be 1 or 3, got {kernel_size}")
    order = [positions.index((r, col)) for r in range(3) for col in range(3)]  # row-major slots
    _, d, C = k.shape
    weight = k[order].reshape(3, 3, d, C).permute(2, 3, 0, 1)
    return weight, (None if b is None else b.sum(0)), o.sum(0)


def bottleneck_conv(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    out_weight: Tensor,
    out_bias: Tensor | None,
    norm: nn.Module | None = None,
) -> Tensor:
    """``k×k conv (C→d) → norm → ReLU → linear (d→C_out)`` on a channels-last map.

    Args:
        x: ``[B, H, W, C]``.
        weight: ``[d, C, k, k]`` (odd ``k``, zero padding ``k // 2``).
        bias: ``[d]`` or ``None``.
        out_weight: ``[C_out, d]``.
        out_bias: ``[C_out]`` or ``None``.
        norm: module on ``[B, d, H, W]`` (BatchNorm2d) or ``None``.

    Returns:
        ``[B, H, W, C_out]``.
    """
    z = F.conv2d(x.permute(0, 3, 1, 2), weight, bias, padding=weight.shape[-1] // 2)
    if norm is not None:
        z = norm(z)
    z = F.relu(z)
    return F.linear(z.permute(0, 2, 3, 1), out_weight, out_bias)
