"""``export(model)``: the searched model as a physically smaller hybrid.

Dropped branches disappear, the kept convolution becomes a plain ``Conv2d`` (batch norm folded
into it by default), skipped attentions lose their norm too, and each FFN keeps only its
selected hidden units. The result has no gates and no search code (:mod:`.hybrid`); in eval
mode it computes what the gated model computes in eval mode.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ev_compress.spvit.convert import get_meta, is_converted
from ev_compress.spvit.flops import model_macs
from ev_compress.spvit.hybrid import (
    ARCH_FORMAT,
    ConvBottleneck,
    SPViTArchError,
    _drop_attention,
    resize_ffn,
)
from ev_compress.spvit.layers import GatedFFN, UnifiedAttention

__all__ = ["SEARCH_FORMAT", "export", "fold_batch_norm", "load_searched", "save_searched"]


def fold_batch_norm(
    weight: Tensor, bias: Tensor | None, bn: nn.BatchNorm2d
) -> tuple[Tensor, Tensor]:
    """Fold an eval-mode BatchNorm2d into the conv before it: ``(weight', bias')``."""
    assert bn.running_var is not None and bn.running_mean is not None
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    b = bias if bias is not None else torch.zeros_like(bn.running_mean)
    return weight * scale[:, None, None, None], (b - bn.running_mean) * scale + bn.bias


def _conv_module(attn: UnifiedAttention, kernel_size: int, fold_bn: bool) -> ConvBottleneck:
    w, b, o = attn.conv_weights(kernel_size)
    o_b = attn.shared_weights()[3]
    bn = attn.bn_3x3 if kernel_size == 3 else attn.bn_1x1
    mod = ConvBottleneck(attn.dim, attn.head_dim, kernel_size, attn.layout, batch_norm=not fold_bn)
    mod = mod.to(device=w.device, dtype=w.dtype)
    with torch.no_grad():
        if fold_bn:
            w, b = fold_batch_norm(w, b, bn)
        else:
            mod.bn.load_state_dict(bn.state_dict())
        mod.conv.weight.copy_(w)
        assert mod.conv.bias is not None
        mod.conv.bias.copy_(b if b is not None else torch.zeros_like(mod.conv.bias))
        mod.proj.weight.copy_(o)
        mod.proj.bias.copy_(o_b if o_b is not None else torch.zeros_like(mod.proj.weight[:, 0]))
    return mod


def export(model: nn.Module, *, fold_bn: bool = True) -> nn.Module:
    """The searched (or forced) model as a hybrid without gates.

    Each block takes its forced choice, else its ``θ > 0`` gates (what eval mode runs); each
    FFN keeps its forced units, else those with ``θ > 0``. ``model`` is not modified.

    Args:
        model: a model converted with :func:`ev_compress.spvit.convert` (and searched).
        fold_bn: fold the convolutions' batch norm into them (eval outputs unchanged);
            ``False`` keeps a ``BatchNorm2d`` (to fine-tune the export).

    Returns:
        The hybrid model in eval mode; ``model.spvit_arch`` holds its architecture (saved by
        :func:`ev_compress.spvit.save_exported`).

    Raises:
        SPViTArchError: if ``model`` is not converted.
    """
    if not is_converted(model):
        raise SPViTArchError("export needs a model converted with ev_compress.spvit.convert")
    meta = get_meta(model)
    macs = round(float(model_macs(model, differentiable=False)))
    out = copy.deepcopy(model)
    del out._spvit_meta
    blocks: list[dict[str, Any]] = []
    for entry in meta.blocks:
        name, family = entry["name"], entry["family"]
        block: Any = out.get_submodule(name)
        gated = block.mlp
        assert isinstance(gated, GatedFFN)
        keep = gated.kept_units()
        block.mlp = resize_ffn(gated.mlp, keep)
        choice = None
        attn = block.attn
        if isinstance(attn, UnifiedAttention):
            choice = attn.decision()
            if choice == "attention":
                block.attn = attn.msa
            elif choice in ("conv3x3", "conv1x1"):
                block.attn = _conv_module(attn, 3 if choice == "conv3x3" else 1, fold_bn)
            else:
                _drop_attention(out, name, block, family)
        blocks.append(
            {
                "name": name,
                "family": family,
                "choice": choice,
                "ffn_hidden": int(keep.numel()),
                "dim": entry["dim"],
                "mid": entry["head_dim"],
                "layout": entry["layout"],
            }
        )
    out.spvit_arch = {  # type: ignore[assignment]
        "format": ARCH_FORMAT,
        "model_name": meta.model_name,
        "model_kwargs": meta.model_kwargs,
        "family": meta.family,
        "input_size": list(meta.input_size),
        "bn_folded": fold_bn,
        "temperature": meta.temperature,
        "tap_order": meta.tap_order,
        "macs": macs,
        "original_macs": meta.original_macs,
        "original_params": meta.original_params,
        "blocks": blocks,
    }
    return out.eval()


SEARCH_FORMAT = "ev-spvit-search/1"


def save_searched(model: nn.Module, path: str | os.PathLike[str]) -> Path:
    """Save a converted (searched) model: gated weights as safetensors + how to rebuild it.

    Raises:
        SPViTArchError: unconverted model, unknown model name, or a path not ending in
            ``.safetensors``.
    """
    from ev_core.checkpoint import save_checkpoint

    if not is_converted(model):
        raise SPViTArchError("save_searched needs a converted model", path=path)
    meta = get_meta(model)
    if meta.model_name is None:
        raise SPViTArchError(
            "the model's timm name is unknown: pass model_name= to convert()", path=path
        )
    if Path(path).suffix != ".safetensors":
        raise SPViTArchError("the searched model must be saved as a .safetensors file", path=path)
    spec = {
        "format": SEARCH_FORMAT,
        "model_name": meta.model_name,
        "model_kwargs": meta.model_kwargs,
        "input_size": list(meta.input_size),
        "temperature": meta.temperature,
        "tap_order": meta.tap_order,
        "theta": meta.theta,
    }
    return save_checkpoint(path, model.state_dict(), config=spec)


def load_searched(path: str | os.PathLike[str], map_location: str = "cpu") -> nn.Module:
    """Re-create, convert and load a model written by :func:`save_searched`.

    Raises:
        SPViTArchError: naming ``path`` when the files are missing, invalid or do not fit.
    """
    import timm

    import ev_core  # noqa: F401  (registers the ev models with timm)
    from ev_compress.spvit.convert import convert
    from ev_core.checkpoint import load_checkpoint

    p = Path(path)
    if not p.is_file():
        raise SPViTArchError("no searched SPViT model here", path=p)
    try:
        state, info = load_checkpoint(p, map_location=map_location)
    except Exception as exc:
        raise SPViTArchError(f"cannot read the weights: {exc}", path=p) from exc
    spec = info.get("config")
    if not isinstance(spec, dict) or spec.get("format") != SEARCH_FORMAT:
        raise SPViTArchError(f"the JSON beside it is not an SPViT search ({SEARCH_FORMAT})", path=p)
    try:
        model = timm.create_model(spec["model_name"], pretrained=False, **spec["model_kwargs"])
        convert(
            model,
            input_size=spec["input_size"],
            temperature=spec["temperature"],
            tap_order=spec["tap_order"],
            theta=spec["theta"],
            model_name=spec["model_name"],
            model_kwargs=spec["model_kwargs"],
        )
        model.load_state_dict(state, strict=True)
    except (RuntimeError, KeyError, TypeError, ValueError) as exc:
        raise SPViTArchError(f"the weights do not fit the saved model: {exc}", path=p) from exc
    return model.to(map_location)
