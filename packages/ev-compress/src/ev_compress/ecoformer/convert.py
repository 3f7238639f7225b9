"""Swap the attention of timm PVTv2 and ev LIT/LITv2 models for :class:`EcoAttention`.

Supported attention modules (found as ``<stage>.blocks.<j>.attn`` / ``block<k>.<j>.attn``):

=====================================  ======================================================
timm ``pvt_v2`` ``Attention``          ``qk ← q``, ``v ← kv[C:]`` (value rows); the spatial
                                       reduction (``sr``/``norm``) is dropped: EcoFormer
                                       attends to all N tokens (SYSTEMS.md §2.2)
ev ``MultiHeadSelfAttention``          ``qk ← qkv[:C]`` (query rows), ``v ← qkv[2C:]``; LIT-S/M/B's
(LIT-Ti; LIT-S/M/B ``RelPosAttention``)  relative-position table has no linear-attention
                                       counterpart and is dropped
ev ``HiLo`` (LITv2)                    Hi-Fi heads first, then Lo-Fi (HiLo's output order):
                                       ``qk ← [h_qkv q rows; l_q]``, ``v ← [h_qkv v rows;
                                       l_kv v rows]``, ``proj ← blockdiag(h_proj, l_proj)``
=====================================  ======================================================

The output projection is copied in every case. :func:`revert` puts the original modules (with
the weights they had at :func:`convert`) back.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ev_compress.ecoformer.attention import EcoAttention
from ev_compress.ecoformer.functional import Form
from ev_core.errors import EvError

__all__ = ["convert", "eco_attentions", "fit_hash", "revert"]

_STAGE_PATTERNS = (
    # timm PVTv2, ev LIT/LITv2; "stages_0" inside timm's features_only wrappers
    re.compile(r"(?:^|\.)(?:stages|layers)[._](\d+)\.blocks\.\d+\.attn$"),
    re.compile(
        r"(?:^|\.)block(\d+)\.\d+\.attn$"
    ),  # ev LIT-Ti and the official PVT layout (1-based)
)


def _stage_of(name: str) -> int | None:
    m = _STAGE_PATTERNS[0].search(name)
    if m:
        return int(m.group(1))
    m = _STAGE_PATTERNS[1].search(name)
    return int(m.group(1)) - 1 if m else None


def _linear(weight: Tensor, bias: Tensor | None) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        lin.weight.copy_(weight)
        if bias is not None:
            lin.bias.copy_(bias)
    return lin.to(weight.device, weight.dtype)


def _rows(layer: nn.Linear, start: int, stop: int) -> tuple[Tensor, Tensor | None]:
    b = layer.bias[start:stop] if layer.bias is not None else None
    return layer.weight[start:stop], b


def _projections(
    module: nn.Module,
) -> tuple[int, tuple[Tensor, Tensor | None], tuple[Tensor, Tensor | None], nn.Linear, float]:
    """``(heads, qk (W, b), v (W, b), proj, proj_drop p)`` of a supported attention module."""
    from timm.models.pvt_v2 import Attention as PvtAttention

    from ev_core.layers.attention import MultiHeadSelfAttention
    from ev_core.layers.hilo import HiLo

    if isinstance(module, PvtAttention):
        C = module.dim
        return (
            module.num_heads,
            _rows(module.q, 0, C),
            _rows(module.kv, C, 2 * C),
            module.proj,
            module.proj_drop.p,
        )
    if isinstance(module, MultiHeadSelfAttention):
        C = module.qkv.in_features
        return (
            module.num_heads,
            _rows(module.qkv, 0, C),
            _rows(module.qkv, 2 * C, 3 * C),
            module.proj,
            module.proj_drop.p,
        )
    if isinstance(module, HiLo):
        qs, vs, projs = [], [], []
        if module.h_heads > 0:
            assert module.h_qkv is not None and module.h_proj is not None
            hd = module.h_dim
            qs.append(_rows(module.h_qkv, 0, hd))
            vs.append(_rows(module.h_qkv, 2 * hd, 3 * hd))
            projs.append(module.h_proj)
        if module.l_heads > 0:
            assert module.l_q is not None and module.l_kv is not None and module.l_proj is not None
            ld = module.l_dim
            qs.append((module.l_q.weight, module.l_q.bias))
            vs.append(_rows(module.l_kv, ld, 2 * ld))
            projs.append(module.l_proj)

        def cat(parts: list[tuple[Tensor, Tensor | None]]) -> tuple[Tensor, Tensor | None]:
            w = torch.cat([p[0] for p in parts])
            has_b = all(p[1] is not None for p in parts)
            return w, torch.cat([p[1] for p in parts]) if has_b else None  # type: ignore[misc]

        proj_w = torch.block_diag(*[p.weight for p in projs])
        proj_b = torch.cat([p.bias for p in projs])
        return module.num_heads, cat(qs), cat(vs), _linear(proj_w, proj_b), 0.0
    raise TypeError(type(module).__name__)


def _from_attention(module: nn.Module, **kwargs: Any) -> EcoAttention:
    heads, (qw, qb), (vw, vb), proj, proj_drop = _projections(module)
    dim = qw.shape[1]
    eco = EcoAttention(dim, heads, qkv_bias=qb is not None, proj_drop=proj_drop, **kwargs)
    eco.to(device=qw.device, dtype=qw.dtype)
    with torch.no_grad():
        eco.qk.weight.copy_(qw)
        eco.v.weight.copy_(vw)
        if qb is not None:
            eco.qk.bias.copy_(qb)
            eco.v.bias.copy_(vb)  # type: ignore[arg-type]
        eco.proj.weight.copy_(proj.weight)
        eco.proj.bias.copy_(proj.bias)
    object.__setattr__(eco, "_original", module)  # unregistered: not in state_dict/parameters
    return eco


def convert(
    model: nn.Module,
    stages: Sequence[int] = (0, 1, 2),
    bits: int = 16,
    num_anchors: int = 25,
    topk: int = 10,
    form: Form = "sum",
) -> nn.Module:
    """Replace the attention of the given stages by :class:`EcoAttention`, in place.

    Args:
        model: a timm ``pvt_v2_*`` model or an ev ``lit_*``/``litv2_*`` model (any model whose
            attention modules are of a supported type, named ``stages.<i>.blocks.<j>.attn``,
            ``layers.<i>.blocks.<j>.attn`` or ``block<i+1>.<j>.attn``; ``stages_<i>`` inside
            timm ``features_only`` backbones), also nested in a larger model.
        stages: 0-based stage indices (paper: stages 1–3, i.e. ``(0, 1, 2)``; LIT/LITv2 have
            attention only in stages 2 and 3).
        bits, num_anchors, topk, form: :class:`EcoAttention` settings.

    Returns:
        ``model``. Call :func:`fit_hash` before its first forward.

    Raises:
        EvError: a selected stage holds an attention type EcoFormer cannot replace, or no
            attention was found in the selected stages.
    """
    wanted = set(stages)
    replaced = 0
    for name, module in list(model.named_modules()):
        stage = _stage_of(name)
        if stage is None or stage not in wanted or isinstance(module, EcoAttention):
            continue
        try:
            eco = _from_attention(module, bits=bits, num_anchors=num_anchors, topk=topk, form=form)
        except TypeError:
            raise EvError(
                f"ecoformer.convert: {name} is a {type(module).__name__}, which has no EcoFormer "
                "conversion (supported: timm pvt_v2 Attention, ev MultiHeadSelfAttention / "
                f"RelPosAttention, ev HiLo); choose other stages than {sorted(wanted)}"
            ) from None
        eco.train(module.training)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, eco)
        replaced += 1
    if not replaced:
        raise EvError(
            f"ecoformer.convert: no attention module found in stages {sorted(wanted)} of "
            f"{type(model).__name__} (already converted, or stages without attention: LIT/LITv2 "
            "stages 0 and 1 are MLP-only)"
        )
    return model


def eco_attentions(model: nn.Module) -> dict[str, EcoAttention]:
    """The :class:`EcoAttention` modules of ``model`` by qualified name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, EcoAttention)}


def revert(model: nn.Module) -> nn.Module:
    """Put back the attention modules :func:`convert` replaced (their weights as at convert).

    Raises:
        EvError: no :class:`EcoAttention` made by :func:`convert` in ``model``.
    """
    found = 0
    for name, eco in eco_attentions(model).items():
        original = getattr(eco, "_original", None)
        if original is None:
            continue
        original.to(device=eco.qk.weight.device)
        original.train(eco.training)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, original)
        found += 1
    if not found:
        raise EvError(
            "ecoformer.revert: the model holds no attention converted by ecoformer.convert"
        )
    return model


def _images(batch: Any) -> Tensor:
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], Tensor):
        return batch[0]
    if isinstance(batch, dict):
        for key in ("image", "images", "img", "input", "x"):
            if isinstance(batch.get(key), Tensor):
                return batch[key]
    raise EvError(
        f"ecoformer.fit_hash: cannot find the image tensor in a batch of type {type(batch).__name__} "
        "(expected a tensor, a (images, ...) tuple/list or a dict with an 'image(s)' key)"
    )


@torch.no_grad()
def fit_hash(
    model: nn.Module,
    batches: Iterable[Any],
    max_images: int | None = None,
    generator: torch.Generator | None = None,
    iterations: int | None = None,
) -> dict[str, Tensor]:
    """Fit the hash of every :class:`EcoAttention` of ``model`` (the paper's one-off KSH step).

    The images of ``batches`` (concatenated, at most ``max_images``) go through the model once,
    in eval mode; each EcoAttention fits its hash on its own input just before it runs, so later
    layers see the codes of the already-fitted earlier ones. The paper fits on one training
    batch (anchors from its first image) and never again.

    Args:
        model: a converted model.
        batches: image tensors ``[B, 3, H, W]`` or ``(images, ...)`` tuples / dicts.
        max_images: cap on the images used (fitting memory grows with ``images · N · k``).
        generator: RNG for the anchor choice.
        iterations: SGD steps per bit (default: each hash's own, paper 100; 0 = random
            projections with fitted anchors, e.g. for counting or timing).

    Returns:
        Per-layer binarised per-bit losses ``[b, h]`` (see :meth:`KernelizedHash.fit`).
    """
    layers = eco_attentions(model)
    if not layers:
        raise EvError(
            "ecoformer.fit_hash: the model has no EcoAttention (call ecoformer.convert first)"
        )
    images: list[Tensor] = []
    count = 0
    for batch in batches:
        x = _images(batch)
        images.append(x)
        count += x.shape[0]
        if max_images is not None and count >= max_images:
            break
    if not images:
        raise EvError("ecoformer.fit_hash: no batches given")
    x = torch.cat(images)[:max_images]
    losses: dict[str, Tensor] = {}
    handles = []
    for name, layer in layers.items():

        def hook(mod: nn.Module, args: tuple[Any, ...], name: str = name) -> None:
            losses[name] = mod.fit(args[0], generator, iterations)  # type: ignore[operator]

        handles.append(layer.register_forward_pre_hook(hook))
    was_training = model.training
    model.eval()
    try:
        model(x)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return losses
