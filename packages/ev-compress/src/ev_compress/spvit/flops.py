"""SPViT's FLOPs model: per-block costs of each choice, differentiable in the gates.

Counts are multiply-accumulates per image (the SPViT/DeiT/Swin papers' "FLOPs"), exactly the
GEMMs and convolutions :class:`torch.utils.flop_counter.FlopCounterMode` counts (÷ 2).
For a block with ``C`` channels, ``h`` heads of width ``d`` (``A = h·d``), an ``H × W`` map and
``N = P + H·W`` tokens (``P`` prefix tokens):

* MSA (ViT): ``N·C·3A + 2·N²·A + N·A·C`` (= SYSTEMS.md's ``4(HW+1)C² + 2C(HW+1)²`` for DeiT);
  Swin: the same per ``n = wh·ww``-token window, times the ``Hp·Wp / n`` windows of the padded
  map; LITv2: :func:`ev_core.layers.hilo.hilo_macs`.
* 3×3 bottleneck: ``(9·C·d + d·C)·HW``; 1×1: ``2·C·d·HW`` (Swin: over the padded map).
* FFN: ``2·N·C`` per kept hidden unit (LITv2's ConvFFN: ``+ 9·HW`` for its depth-wise conv).
* Everything else (patch embedding, merging layers, head) is measured once by
  :func:`ev_compress.spvit.convert` and added as a constant.

The official code adds ``2·C·N`` per block for the two LayerNorms, which no FLOPs counter
counts (≈ 0.05 % of DeiT-S); we leave it out so the model equals measured counts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ev_compress.spvit.gates import cumulative_gates, flops_indicator
from ev_compress.spvit.hybrid import BLOCK_CHOICES, TokenLayout

__all__ = ["BlockCosts", "block_costs", "gated_macs", "model_gflops", "model_macs"]


@dataclass
class BlockCosts:
    """MACs per image of one block's choices and of one FFN hidden unit."""

    attention: int
    conv3x3: int
    conv1x1: int
    ffn_per_unit: int
    ffn_units: int

    def choice(self, name: str) -> int:
        return {"attention": self.attention, "conv3x3": self.conv3x3, "conv1x1": self.conv1x1}.get(
            name, 0
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def block_costs(
    family: str,
    *,
    dim: int,
    num_heads: int,
    head_dim: int,
    hw: tuple[int, int],
    ffn_hidden: int,
    layout: TokenLayout | None = None,
    msa: Any = None,
) -> BlockCosts:
    """The FLOPs model of one block (see the module docstring).

    Args:
        family: ``"vit"``, ``"swin"`` or ``"lit"``.
        dim, num_heads, head_dim: ``C``, ``h``, ``d`` (0 heads: a block without attention).
        hw: the block's map ``(H, W)``.
        ffn_hidden: FFN hidden units.
        layout: the attention's token layout (prefix tokens, Swin window).
        msa: the HiLo module (``"lit"``: its window size and ``alpha``).
    """
    H, W = hw
    C, d, A = dim, head_dim, num_heads * head_dim
    hw_n = H * W
    if family == "vit":
        n = hw_n + (layout.num_prefix_tokens if layout else 0)
        attn = n * C * 3 * A + 2 * n * n * A + n * A * C
        conv_tokens, ffn_unit = hw_n, 2 * n * C
    elif family == "swin":
        assert layout is not None and layout.window is not None
        wh, ww = layout.window
        Hp, Wp = -(-H // wh) * wh, -(-W // ww) * ww
        n = wh * ww
        windows = Hp * Wp // n
        attn = windows * (n * C * 3 * A + 2 * n * n * A + n * A * C)
        conv_tokens, ffn_unit = Hp * Wp, 2 * hw_n * C
    elif family == "lit":
        from ev_core.layers.hilo import hilo_macs

        attn = 0 if msa is None else hilo_macs(C, num_heads, hw, msa.ws, msa.alpha)
        conv_tokens, ffn_unit = hw_n, 2 * hw_n * C + 9 * hw_n
    else:
        raise ValueError(f"unknown family {family!r}")
    return BlockCosts(
        attention=attn,
        conv3x3=(9 * C * d + d * C) * conv_tokens if num_heads else 0,
        conv1x1=2 * C * d * conv_tokens if num_heads else 0,
        ffn_per_unit=ffn_unit,
        ffn_units=ffn_hidden,
    )


def gated_macs(costs: BlockCosts, attn_gates: Tensor | None, ffn_gates: Tensor) -> Tensor:
    """MACs of one block for cumulative attention gates ``[3]`` and FFN gates ``[hidden]``.

    ``g₁·c₁ₓ₁ + g₂·(c₃ₓ₃ − c₁ₓ₁) + g₃·(c_MSA − c₃ₓ₃) + c_unit·Σ g_ffn`` (float64).
    """
    total = costs.ffn_per_unit * ffn_gates.to(torch.float64).sum()
    if attn_gates is not None:
        g = attn_gates.to(torch.float64)
        total = total + g[0] * costs.conv1x1
        total = total + g[1] * (costs.conv3x3 - costs.conv1x1)
        total = total + g[2] * (costs.attention - costs.conv3x3)
    return total


def _fixed(index: int, like: Tensor) -> Tensor:
    return (torch.arange(3, device=like.device) < index).to(torch.float64)


def model_macs(model: nn.Module, differentiable: bool = True) -> Tensor:
    """MACs per image of a converted model under its current gates (float64 scalar tensor).

    Args:
        model: a model returned by :func:`ev_compress.spvit.convert`.
        differentiable: use the straight-through FLOPs indicators (for the loss); else the
            hard decisions (what :func:`~ev_compress.spvit.export` would keep).
    """
    from ev_compress.spvit.convert import get_meta
    from ev_compress.spvit.layers import GatedFFN, UnifiedAttention

    meta = get_meta(model)
    total: Tensor | None = None
    for entry in meta.blocks:
        block: Any = model.get_submodule(entry["name"])
        attn = block.attn if isinstance(block.attn, UnifiedAttention) else None
        ffn = block.mlp
        assert isinstance(ffn, GatedFFN)
        if bool(ffn.forced):
            fg = ffn.forced_mask
        elif differentiable:
            fg = flops_indicator(ffn.ffn_thresholds)
        else:
            fg = (ffn.ffn_thresholds > 0).to(torch.float64)
        ag = None
        if attn is not None:
            forced = int(attn.forced)
            if forced >= 0:
                ag = _fixed(forced, fg)
            elif differentiable:
                ag = cumulative_gates(flops_indicator(attn.kernel_thresholds), detach_lower=False)
            else:
                ag = _fixed(BLOCK_CHOICES.index(attn.decision()), fg)
        costs = BlockCosts(**entry["costs"])
        m = gated_macs(costs, ag, fg)
        total = m if total is None else total + m
    rest = torch.tensor(float(meta.rest_macs), dtype=torch.float64)
    return rest if total is None else total + rest.to(total.device)


def model_gflops(model: nn.Module, differentiable: bool = True) -> Tensor:
    """:func:`model_macs` in units of 10⁹ (the loss's and the paper's "GFLOPs")."""
    return model_macs(model, differentiable) / 1e9
