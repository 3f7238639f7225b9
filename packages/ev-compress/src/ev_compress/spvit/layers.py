"""The search-time modules: the unified attention block and the gated FFN.

:class:`UnifiedAttention` wraps an MSA (timm ``Attention``, timm Swin ``WindowAttention`` or ev
``HiLo``) and computes, from the MSA's own value/output weights (see :mod:`.ops`), a 3×3 and a
1×1 bottleneck convolution; three gates choose among attention, 3×3, 1×1 and skip.
:class:`GatedFFN` wraps an FFN with one gate per hidden unit, applied after the activation.

Both fix their choice with :func:`ev_compress.spvit.force_choice`; in eval mode (and when
forced) only the chosen branch runs, so a block forced to attention *is* the original MSA.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ev_compress.spvit.gates import (
    branch_coefficients,
    choice_index,
    cumulative_gates,
    relaxed_bernoulli_st,
)
from ev_compress.spvit.hybrid import BLOCK_CHOICES, SPViTArchError, TokenLayout, on_token_map
from ev_compress.spvit.ops import TAP_ORDERS, TapOrder, bottleneck_conv, conv_kernels

__all__ = ["GatedFFN", "UnifiedAttention", "shared_value_output"]


def shared_value_output(
    msa: Any, family: str
) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None]:
    """The value and output projections of an MSA, as views of its own parameters.

    Args:
        msa: timm ``Attention`` (``"vit"``), timm ``WindowAttention`` (``"swin"``) or ev
            ``HiLo`` (``"lit"``).
        family: which of the three.

    Returns:
        ``v_weight [h·d, C]``, ``v_bias [h·d]`` or ``None``, ``proj_weight [C, h·d]``,
        ``proj_bias [C]`` or ``None``; heads in the order of the MSA's output channels.
    """
    if family in ("vit", "swin"):
        A = msa.qkv.out_features // 3
        v_b = msa.qkv.bias[2 * A :] if msa.qkv.bias is not None else None
        return msa.qkv.weight[2 * A :], v_b, msa.proj.weight, msa.proj.bias
    if family == "lit":  # HiLo: Hi-Fi heads first, then Lo-Fi (its output concat order)
        ws, bs, os_, obs = [], [], [], []
        if msa.h_heads > 0:
            D = msa.h_dim
            ws.append(msa.h_qkv.weight[2 * D :])
            bs.append(None if msa.h_qkv.bias is None else msa.h_qkv.bias[2 * D :])
            os_.append(msa.h_proj.weight)
            obs.append(msa.h_proj.bias)
        if msa.l_heads > 0:
            D = msa.l_dim
            ws.append(msa.l_kv.weight[D:])
            bs.append(None if msa.l_kv.bias is None else msa.l_kv.bias[D:])
            os_.append(msa.l_proj.weight)
            obs.append(msa.l_proj.bias)
        v_b = None if any(b is None for b in bs) else torch.cat([b for b in bs if b is not None])
        return torch.cat(ws), v_b, torch.block_diag(*os_), torch.cat(obs)
    raise ValueError(f"unknown attention family {family!r}")


def _check_msa(msa: Any, family: str) -> None:
    if family == "vit":
        if (
            not isinstance(getattr(msa, "norm", nn.Identity()), nn.Identity)
            or getattr(msa, "gate", None) is not None
        ):
            raise SPViTArchError(
                "SPViT needs a linear value→output path: attention with scale_norm or a "
                "gated output is not supported"
            )
        if msa.qkv.out_features != 3 * msa.num_heads * msa.head_dim:
            raise SPViTArchError("SPViT needs a fused qkv projection of 3·heads·head_dim rows")


class UnifiedAttention(nn.Module):
    """An MSA sharing its value/output weights with 3×3 and 1×1 bottleneck convolutions.

    ``forward(x, *args, **kwargs)`` takes the wrapped MSA's arguments and returns its shape.

    Parameters: ``head_probs [h, 9]`` (ones), ``kernel_thresholds [3]`` (gate logits θ for
    conv1×1, conv3×3, attention; initialised to ``theta``), ``bn_1x1`` / ``bn_3x3``
    (BatchNorm2d(d)). Buffer ``forced``: −1 = searched, else the fixed choice index.

    Args:
        msa: the attention module (kept as ``self.msa``, called unchanged for attention).
        family: ``"vit"``, ``"swin"`` or ``"lit"``.
        layout: how its tokens form a map for the convolution.
        temperature: head-mixture softmax temperature ``T`` (DeiT 1e-2, Swin 1e2).
        tap_order: ``"deit"`` or ``"swin"`` (see :mod:`.ops`).
        theta: initial gate logit.
    """

    forced: Tensor

    def __init__(
        self,
        msa: nn.Module,
        family: str,
        layout: TokenLayout,
        temperature: float = 1e-2,
        tap_order: TapOrder = "deit",
        theta: float = 1.5,
    ) -> None:
        super().__init__()
        if tap_order not in TAP_ORDERS:
            raise ValueError(f"tap_order must be one of {TAP_ORDERS}, got {tap_order!r}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        _check_msa(msa, family)
        self.msa = msa
        self.family = family
        self.layout = layout
        self.temperature = float(temperature)
        self.tap_order: TapOrder = tap_order
        v_w = shared_value_output(msa, family)[0]
        self.num_heads = int(msa.num_heads)  # type: ignore[arg-type]
        self.dim = int(v_w.shape[1])
        self.head_dim = int(v_w.shape[0]) // self.num_heads
        dev, dt = v_w.device, v_w.dtype
        self.head_probs = nn.Parameter(torch.ones(self.num_heads, 9, device=dev, dtype=dt))
        self.kernel_thresholds = nn.Parameter(torch.full((3,), float(theta), device=dev, dtype=dt))
        self.bn_1x1 = nn.BatchNorm2d(self.head_dim, device=dev, dtype=dt)
        self.bn_3x3 = nn.BatchNorm2d(self.head_dim, device=dev, dtype=dt)
        self.register_buffer("forced", torch.tensor(-1, device=v_w.device))
        self.costs: Any = None  # BlockCosts, set by convert()

    def shared_weights(self) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None]:
        """``(v_weight, v_bias, proj_weight, proj_bias)`` of the wrapped MSA."""
        return shared_value_output(self.msa, self.family)

    def conv_weights(self, kernel_size: int) -> tuple[Tensor, Tensor | None, Tensor]:
        """The ``kernel_size`` branch's ``(weight [d, C, k, k], bias [d], out_weight [C, d])``."""
        v_w, v_b, o_w, _ = self.shared_weights()
        return conv_kernels(
            v_w, v_b, o_w, self.head_probs, self.temperature, kernel_size, self.tap_order
        )

    def conv_branch(
        self, x: Tensor, kernel_size: int, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Tensor:
        """The bottleneck-conv output for tokens ``x`` (prefix tokens pass through)."""
        w, b, o = self.conv_weights(kernel_size)
        o_b = self.shared_weights()[3]
        bn = self.bn_3x3 if kernel_size == 3 else self.bn_1x1
        return on_token_map(
            x, self.layout, lambda m: bottleneck_conv(m, w, b, o, o_b, bn), args, kwargs
        )

    def branch(
        self, index: int, x: Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Tensor:
        """Output of one choice (index into ``BLOCK_CHOICES``)."""
        if index == 3:
            return self.msa(x, *args, **kwargs)
        if index in (1, 2):
            return self.conv_branch(x, 3 if index == 2 else 1, args, kwargs)
        return torch.zeros_like(x)

    def current_choice(self) -> int | None:
        """The fixed choice index (forced, or the threshold decision in eval mode), or ``None``
        while searching in training mode."""
        forced = int(self.forced)
        if forced >= 0:
            return forced
        if not self.training:
            return choice_index(self.kernel_thresholds)
        return None

    def decision(self) -> str:
        """The block's choice as exported: forced, else ``θ > 0`` gates."""
        forced = int(self.forced)
        return BLOCK_CHOICES[forced if forced >= 0 else choice_index(self.kernel_thresholds)]

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        choice = self.current_choice()
        if choice is not None:
            return self.branch(choice, x, args, kwargs)
        g = cumulative_gates(relaxed_bernoulli_st(self.kernel_thresholds))
        c_attn, c_3x3, c_1x1 = branch_coefficients(g)
        out = c_attn * self.msa(x, *args, **kwargs)
        out = out + c_3x3 * self.conv_branch(x, 3, args, kwargs)
        return out + c_1x1 * self.conv_branch(x, 1, args, kwargs)

    def extra_repr(self) -> str:
        return (
            f"family={self.family}, heads={self.num_heads}, head_dim={self.head_dim}, "
            f"temperature={self.temperature}, tap_order={self.tap_order}"
        )


class GatedFFN(nn.Module):
    """A timm ``Mlp`` / ev ``ConvFFN`` with one gate per hidden unit (after the activation).

    ``forward(x, hw=None)``; parameter ``ffn_thresholds [hidden]`` (gate logits), buffers
    ``forced`` (bool) and ``forced_mask [hidden]``.

    Args:
        mlp: the FFN (kept as ``self.mlp``).
        theta: initial gate logit.
    """

    forced: Tensor
    forced_mask: Tensor

    def __init__(self, mlp: nn.Module, theta: float = 1.5) -> None:
        super().__init__()
        fc1, fc2 = getattr(mlp, "fc1", None), getattr(mlp, "fc2", None)
        if not isinstance(fc1, nn.Linear) or not isinstance(fc2, nn.Linear):
            raise SPViTArchError(f"unsupported FFN {type(mlp).__name__}: needs Linear fc1/fc2")
        if not isinstance(getattr(mlp, "norm", nn.Identity()), nn.Identity):
            raise SPViTArchError("FFN gates need an FFN without a hidden-layer norm")
        self.mlp = mlp
        self.conv_ffn = hasattr(mlp, "dwconv")
        self.hidden = fc1.out_features
        dev, dt = fc1.weight.device, fc1.weight.dtype
        self.ffn_thresholds = nn.Parameter(
            torch.full((self.hidden,), float(theta), device=dev, dtype=dt)
        )
        self.register_buffer("forced", torch.tensor(False, device=dev))
        self.register_buffer("forced_mask", torch.ones(self.hidden, device=dev, dtype=dt))

    def unit_mask(self) -> Tensor:
        """``[hidden]`` 0/1 gates: forced, sampled (training) or ``θ > 0`` (eval)."""
        if bool(self.forced):
            return self.forced_mask
        if self.training:
            return relaxed_bernoulli_st(self.ffn_thresholds)
        return (self.ffn_thresholds > 0).to(self.ffn_thresholds.dtype)

    def kept_units(self) -> Tensor:
        """Indices of the hidden units the exported model keeps."""
        mask = self.forced_mask if bool(self.forced) else (self.ffn_thresholds > 0)
        return torch.nonzero(mask.detach() > 0.5).flatten()

    def forward(self, x: Tensor, hw: tuple[int, int] | None = None) -> Tensor:
        m: Any = self.mlp
        mask = self.unit_mask()
        if not mask.requires_grad and bool((mask > 0.5).all()):  # every unit on: the original
            return m(x, hw) if self.conv_ffn else m(x)
        h = m.fc1(x)
        if self.conv_ffn:
            h = m.dwconv(h, hw)
        h = m.act(h) * mask.to(h.dtype)
        if self.conv_ffn:
            return m.drop(m.fc2(m.drop(h)))
        return m.drop2(m.fc2(m.norm(m.drop1(h))))

    def extra_repr(self) -> str:
        return f"hidden={self.hidden}"
