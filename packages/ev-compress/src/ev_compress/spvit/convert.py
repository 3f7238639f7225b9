"""``convert(model)``: put SPViT's unified attention and FFN gates into a timm / ev model, and
``force_choice(model, ...)``: fix the gates.

Supported: timm ``deit_*`` / ``vit_*`` (``VisionTransformer`` blocks with the standard
``Attention``), timm ``swin_*`` (``SwinTransformerBlock``) and ev ``litv2_*`` (HiLo; stages 1–2
have no attention and only get FFN gates).

``convert`` runs one probe forward (batch 1, eval mode, autograd on so that ev-core's fused
oneDNN inference kernels, which no FLOP counter knows, are not used) under
:class:`torch.utils.flop_counter.FlopCounterMode` to record each block's map size and to
measure the cost of everything that is not searched (embedding, merging, head).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ev_compress.spvit.flops import block_costs
from ev_compress.spvit.hybrid import (
    BLOCK_CHOICES,
    SPViTArchError,
    TokenLayout,
    _vit_grid,
    find_blocks,
)
from ev_compress.spvit.layers import GatedFFN, UnifiedAttention
from ev_compress.spvit.ops import TAP_ORDERS, TapOrder

__all__ = [
    "SPViTMeta",
    "convert",
    "default_gate_settings",
    "force_choice",
    "get_meta",
    "is_converted",
]

_DEFAULTS: dict[str, tuple[float, str]] = {
    "vit": (1e-2, "deit"),  # official DeiT tree
    "swin": (1e2, "swin"),  # official Swin tree
    "lit": (1e-2, "deit"),  # no official LITv2 search: the DeiT settings (our choice)
}


def default_gate_settings(family: str) -> tuple[float, str]:
    """``(temperature, tap_order)`` the official code uses for a family (LITv2: DeiT's)."""
    return _DEFAULTS[family]


@dataclass
class SPViTMeta:
    """What :func:`convert` recorded (kept on the model as ``model._spvit_meta``)."""

    family: str
    input_size: tuple[int, int, int]
    rest_macs: int
    original_macs: int
    original_params: int
    temperature: float
    tap_order: str
    theta: float
    model_name: str | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    blocks: list[dict[str, Any]] = field(default_factory=list)


def is_converted(model: nn.Module) -> bool:
    """Whether ``model`` went through :func:`convert`."""
    return isinstance(getattr(model, "_spvit_meta", None), SPViTMeta)


def get_meta(model: nn.Module) -> SPViTMeta:
    """The :class:`SPViTMeta` of a converted model.

    Raises:
        SPViTArchError: if ``model`` was not converted.
    """
    meta = getattr(model, "_spvit_meta", None)
    if not isinstance(meta, SPViTMeta):
        raise SPViTArchError("the model was not converted with ev_compress.spvit.convert")
    return meta


def _input_size(model: nn.Module, input_size: Sequence[int] | None) -> tuple[int, int, int]:
    if input_size is not None:
        size = tuple(int(s) for s in input_size)
        if len(size) == 2:
            size = (3, *size)
        if len(size) != 3 or min(size) < 1:
            raise SPViTArchError(f"input_size must be (C, H, W) or (H, W), got {input_size}")
        return (size[0], size[1], size[2])
    embed = getattr(model, "patch_embed", None)
    img = getattr(embed, "img_size", None) or getattr(model, "img_size", None)
    chans = getattr(getattr(embed, "proj", None), "in_channels", 3)
    if img is None:
        img = dict(getattr(model, "pretrained_cfg", {}) or {}).get("input_size", (3, 224, 224))[1:]
    if isinstance(img, int):
        img = (img, img)
    return (int(chans), int(img[0]), int(img[1]))


def _probe(
    model: nn.Module, blocks: list[tuple[str, nn.Module, str]], size: tuple[int, int, int]
) -> tuple[dict[str, tuple[Any, ...]], dict[str, int], int]:
    """Block inputs, per-module measured FLOPs and the total of one batch-1 forward."""
    from ev_core.flops import extra_flop_formulas

    inputs: dict[str, tuple[Any, ...]] = {}
    handles = []
    for name, block, _ in blocks:

        def hook(
            mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], name: str = name
        ) -> None:
            inputs[name] = (args[0].shape, args[1] if len(args) > 1 else kwargs.get("hw"))

        handles.append(block.register_forward_pre_hook(hook, with_kwargs=True))
    param = next(model.parameters())
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False, custom_mapping=extra_flop_formulas())
    try:  # with grad on: ev-core's fused oneDNN inference ops (uncounted) stay off
        with counter, torch.enable_grad():
            model(torch.randn(1, *size, device=param.device, dtype=param.dtype))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    root = type(model).__name__
    per_module = {
        k[len(root) + 1 :]: sum(int(v) for v in ops.values())
        for k, ops in counter.get_flop_counts().items()
        if k.startswith(root + ".")
    }
    return inputs, per_module, int(counter.get_total_flops())


def convert(
    model: nn.Module,
    *,
    input_size: Sequence[int] | None = None,
    temperature: float | None = None,
    tap_order: TapOrder | None = None,
    theta: float = 1.5,
    model_name: str | None = None,
    model_kwargs: dict[str, Any] | None = None,
) -> nn.Module:
    """Replace every supported block's attention by :class:`UnifiedAttention` and its FFN by
    :class:`GatedFFN` (in place; weights are shared, not copied).

    Args:
        model: a timm ViT/DeiT, timm Swin or ev LITv2 model (load pretrained weights first).
        input_size: ``(C, H, W)`` the FLOPs model is built for (default: the model's).
        temperature: head-mixture temperature (default: 1e-2 ViT/LITv2, 1e2 Swin).
        tap_order: ``"deit"`` / ``"swin"`` (default: ``"deit"`` ViT/LITv2, ``"swin"`` Swin).
        theta: initial gate logit (official 1.5).
        model_name: the timm name to re-create the model with when loading an export
            (default: ``model.pretrained_cfg["architecture"]``).
        model_kwargs: the keyword arguments it was created with (default: ``num_classes``).

    Returns:
        ``model``.

    Raises:
        SPViTArchError: already converted, or no supported block.
    """
    if is_converted(model):
        raise SPViTArchError("the model is already converted for SPViT")
    blocks = list(find_blocks(model))
    if not blocks:
        raise SPViTArchError(
            f"{type(model).__name__} has no supported transformer block (SPViT supports timm "
            "deit_*/vit_*, swin_* and ev litv2_* models)"
        )
    families = {fam for _, _, fam in blocks}
    if len(families) != 1:
        raise SPViTArchError(f"mixed block families {sorted(families)} are not supported")
    family = families.pop()
    t_default, order_default = default_gate_settings(family)
    temperature = t_default if temperature is None else float(temperature)
    order = order_default if tap_order is None else tap_order
    if order not in TAP_ORDERS:
        raise SPViTArchError(f"tap_order must be one of {TAP_ORDERS}, got {order!r}")
    size = _input_size(model, input_size)
    inputs, measured, total = _probe(model, blocks, size)
    arch = dict(getattr(model, "pretrained_cfg", None) or {}).get("architecture")
    kwargs = dict(model_kwargs) if model_kwargs is not None else {}
    num_classes: Any = getattr(model, "num_classes", None)
    if model_kwargs is None and num_classes is not None:
        kwargs["num_classes"] = int(num_classes)
    meta = SPViTMeta(
        family=family,
        input_size=size,
        rest_macs=0,
        original_macs=total // 2,
        original_params=sum(p.numel() for p in model.parameters()),
        temperature=temperature,
        tap_order=order,
        theta=float(theta),
        model_name=model_name or arch,
        model_kwargs=kwargs,
    )
    block: Any
    for name, block, fam in blocks:
        if name not in inputs:
            raise SPViTArchError(f"block {name!r} was not run by a forward pass")
        shape, hw = inputs[name]
        msa = block.attn
        if fam == "vit":
            P = int(getattr(model, "num_prefix_tokens", 1))
            grid = (
                tuple(getattr(getattr(model, "patch_embed", None), "grid_size", ()) or ()) or None
            )
            hw = _vit_grid(int(shape[1]) - P, grid)
            layout = TokenLayout("vit", num_prefix_tokens=P, grid=hw)
        elif fam == "swin":
            hw = (int(shape[1]), int(shape[2]))
            wh, ww = (int(w) for w in msa.window_size)
            layout = TokenLayout("swin", window=(wh, ww))
        else:
            hw = (int(hw[0]), int(hw[1]))
            layout = TokenLayout("lit")
        dim = int(block.norm2.normalized_shape[0])
        heads = int(msa.num_heads) if msa is not None else 0
        head_dim = 0
        if msa is not None:
            head_dim = (msa.qkv.out_features // 3 if fam != "lit" else dim) // heads
        costs = block_costs(
            fam,
            dim=dim,
            num_heads=heads,
            head_dim=head_dim,
            hw=hw,
            ffn_hidden=block.mlp.fc1.out_features,
            layout=layout,
            msa=msa,
        )
        m_attn = measured.get(f"{name}.attn", 0) // 2 if msa is not None else 0
        m_mlp = measured.get(f"{name}.mlp", 0) // 2
        predicted = (costs.attention, costs.ffn_per_unit * costs.ffn_units)
        if predicted != (m_attn, m_mlp):
            warnings.warn(
                f"SPViT FLOPs model of block {name!r} {predicted} differs from the measured "
                f"(attention, FFN) MACs {(m_attn, m_mlp)}",
                stacklevel=2,
            )
        meta.rest_macs -= m_attn + m_mlp
        if msa is not None:
            block.attn = UnifiedAttention(msa, fam, layout, temperature, order, theta)  # type: ignore[arg-type]
            block.attn.costs = costs
        block.mlp = GatedFFN(block.mlp, theta)
        meta.blocks.append(
            {
                "name": name,
                "family": fam,
                "hw": list(hw),
                "dim": dim,
                "heads": heads,
                "head_dim": head_dim,
                "has_attention": msa is not None,
                "layout": layout.to_dict(),
                "costs": costs.to_dict(),
            }
        )
    meta.rest_macs += total // 2
    model._spvit_meta = meta  # type: ignore[assignment]
    return model


def _attention_modules(model: nn.Module) -> list[UnifiedAttention]:
    return [m for m in model.modules() if isinstance(m, UnifiedAttention)]


def force_choice(
    model: nn.Module,
    choice: str | Sequence[str] | None,
    *,
    ffn: str | None = "all",
) -> nn.Module:
    """Fix (or release) every block's gates of a converted model.

    Args:
        model: a converted model.
        choice: ``"attention"``, ``"conv3x3"``, ``"conv1x1"`` or ``"skip"`` for every block;
            ``"searched"`` to freeze each block's current decision (``θ > 0`` gates, for the
            fine-tune after a search); a sequence of those, one per attention block; or
            ``None`` to release the gates (search again).
        ffn: ``"all"`` (every hidden unit on: the original FFN), ``"searched"`` (freeze the
            current ``θ > 0`` units) or ``None`` (release the FFN gates).

    Returns:
        ``model``.

    Raises:
        SPViTArchError: not converted, unknown choice, or a sequence of the wrong length.
    """
    if not is_converted(model):
        raise SPViTArchError("force_choice needs a model converted with ev_compress.spvit.convert")
    attns = _attention_modules(model)
    if choice is None or isinstance(choice, str):
        choices: list[str | None] = [choice] * len(attns)
    else:
        choices = list(choice)
        if len(choices) != len(attns):
            raise SPViTArchError(f"got {len(choices)} choices for {len(attns)} attention blocks")
    valid = (*BLOCK_CHOICES, "searched")
    for c in choices:
        if c is not None and c not in valid:
            raise SPViTArchError(f"unknown choice {c!r}: expected one of {valid} or None")
    if ffn not in ("all", "searched", None):
        raise SPViTArchError(f"ffn must be 'all', 'searched' or None, got {ffn!r}")
    with torch.no_grad():
        for attn, c in zip(attns, choices):
            if c is None:
                attn.forced.fill_(-1)
            elif c == "searched":
                attn.forced.fill_(BLOCK_CHOICES.index(attn.decision()))
            else:
                attn.forced.fill_(BLOCK_CHOICES.index(c))
        for m in model.modules():
            if not isinstance(m, GatedFFN):
                continue
            assert isinstance(m.forced, torch.Tensor)
            if ffn is None:
                m.forced.fill_(False)
            elif ffn == "all":
                m.forced_mask.fill_(1.0)
                m.forced.fill_(True)
            else:
                m.forced_mask.copy_((m.ffn_thresholds > 0).to(m.forced_mask.dtype))
                m.forced.fill_(True)
    return model
