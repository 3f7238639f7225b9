"""Load the official EcoFormer PVTv2 checkpoints (ziplab/EcoFormer) into a converted timm model.

The official PVTv2 layout names modules ``patch_embed{k}``, ``block{k}.{j}``, ``norm{k}``
(k = 1..4) and ``mlp.dwconv.dwconv``; its EcoFormer attention holds ``to_qk``, ``to_v``,
``proj`` and ``fast_attention.ksh.{A [h,b,m], mvec [1,h,1,m], anchor [1,h,m,d]}`` plus an unused
Performer ``fast_attention.projection_matrix``; its stage-4 MSA has one fused ``qkv``. The
MSA fine-tune checkpoints of the recipe's first step (``pvt_v2_b*_msa``) hold ``qkv`` in every
stage: loaded into an EcoFormer stage they give ``qk`` ← query rows and ``v`` ← value rows and
leave the hash unfitted (run :func:`~ev_compress.ecoformer.fit_hash`).
"""

from __future__ import annotations

import argparse
import os
import re
from typing import Any

import torch
from torch import Tensor, nn

from ev_compress.ecoformer.attention import EcoAttention
from ev_core.errors import EvError

__all__ = ["load_official_checkpoint", "official_to_timm"]

_KSH = "fast_attention.ksh."


def _timm_name(key: str) -> str:
    """Official PVTv2 module path → timm ``pvt_v2`` module path."""
    m = re.match(r"patch_embed(\d)\.(.*)", key)
    if m:
        k = int(m.group(1))
        return ("patch_embed." if k == 1 else f"stages.{k - 1}.downsample.") + m.group(2)
    key = re.sub(
        r"^block(\d)\.(\d+)\.", lambda g: f"stages.{int(g.group(1)) - 1}.blocks.{g.group(2)}.", key
    )
    key = re.sub(r"^norm(\d)\.", lambda g: f"stages.{int(g.group(1)) - 1}.norm.", key)
    return key.replace("mlp.dwconv.dwconv.", "mlp.dwconv.")


def official_to_timm(state_dict: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """Map an official EcoFormer/PVTv2 state dict onto ``model`` (timm ``pvt_v2`` after
    :func:`~ev_compress.ecoformer.convert`).

    Returns:
        A state dict for ``model.load_state_dict(..., strict=True)``. EcoFormer layers that the
        checkpoint gives no hash for keep their current (unfitted) hash buffers.
    """
    out: dict[str, Tensor] = {}
    with_hash: set[str] = set()
    for key, value in state_dict.items():
        key = _timm_name(key.removeprefix("module."))
        attn_path, sep, rest = key.partition(".attn.")
        if not sep:
            out[key] = value
            continue
        attn_path += ".attn"
        try:
            target = model.get_submodule(attn_path)
        except AttributeError:
            out[key] = value  # let load_state_dict report it
            continue
        if isinstance(target, EcoAttention):
            h, d = target.num_heads, target.head_dim
            if rest.startswith("to_qk."):
                out[f"{attn_path}.qk.{rest[6:]}"] = value
            elif rest.startswith("to_v."):
                out[f"{attn_path}.v.{rest[5:]}"] = value
            elif rest.startswith(_KSH):
                name = rest[len(_KSH) :]
                with_hash.add(attn_path)
                if name == "A":
                    out[f"{attn_path}.hash.projection"] = value
                elif name == "mvec":
                    out[f"{attn_path}.hash.kernel_mean"] = value.reshape(h, -1)
                elif name == "anchor":
                    out[f"{attn_path}.hash.anchors"] = value.reshape(h, -1, d)
                else:
                    out[key] = value
            elif rest == "fast_attention.projection_matrix":
                continue  # Performer leftover, unused by EcoFormer
            elif rest.startswith("qkv."):  # MSA fine-tune checkpoint: q rows → qk, v rows → v
                C = value.shape[0] // 3
                out[f"{attn_path}.qk.{rest[4:]}"] = value[:C]
                out[f"{attn_path}.v.{rest[4:]}"] = value[2 * C :]
            else:
                out[key] = value
        elif rest.startswith("qkv."):  # timm Attention keeps q and kv apart
            C = value.shape[0] // 3
            out[f"{attn_path}.q.{rest[4:]}"] = value[:C]
            out[f"{attn_path}.kv.{rest[4:]}"] = value[C:]
        else:
            out[key] = value
    own = model.state_dict()
    for path, layer in model.named_modules():
        if isinstance(layer, EcoAttention):
            for buf in ("projection", "anchors", "kernel_mean", "fitted"):
                k = f"{path}.hash.{buf}"
                if path in with_hash:
                    out.setdefault(
                        k, torch.ones((), dtype=torch.bool) if buf == "fitted" else own[k]
                    )
                else:
                    out[k] = own[k]
    return out


def load_official_checkpoint(
    model: nn.Module,
    checkpoint: str | os.PathLike[str] | dict[str, Any],
    trusted: bool = False,
) -> nn.Module:
    """Load an official EcoFormer PVTv2 checkpoint (file or dict) into a converted timm model.

    Args:
        model: ``timm.create_model("pvt_v2_bX")`` after ``ecoformer.convert(model, form="token")``
            (the released weights were trained with the ``token`` form).
        checkpoint: a ``.pth`` path, or the loaded object (``{"model": state_dict}`` or a state
            dict). Files are read with ``torch.load(weights_only=True)``, allowing the
            ``argparse.Namespace`` the official training script stores under ``"args"``.
        trusted: read the file with full unpickling (``weights_only=False``) for checkpoints
            holding other Python objects; only for files from a source you trust.

    Returns:
        ``model``, loaded strictly.

    Raises:
        EvError: unreadable file, or keys/shapes that do not match the model (the message lists
            them: e.g. a checkpoint of another PVTv2 size, or stages converted differently).
    """
    path = None
    loaded: Any = checkpoint
    if not isinstance(checkpoint, dict):
        path = checkpoint
        try:
            with torch.serialization.safe_globals([argparse.Namespace]):
                loaded = torch.load(path, map_location="cpu", weights_only=not trusted)
        except Exception as exc:  # any failure to unpickle a user file is a problem with the file
            hint = (
                ""
                if trusted
                else " (if it holds other Python objects and you trust it: trusted=True)"
            )
            raise EvError(f"cannot read the EcoFormer checkpoint{hint}: {exc}", path=path) from exc
    if not isinstance(loaded, dict):
        raise EvError(
            "not an EcoFormer checkpoint (expected a state dict or {'model': ...})", path=path
        )
    state = loaded.get("model", loaded.get("state_dict", loaded))
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise EvError(
            "not an EcoFormer checkpoint (expected a state dict or {'model': ...})", path=path
        )
    try:
        mapped = official_to_timm(state, model)
    except (RuntimeError, ValueError) as exc:  # e.g. a hash buffer that cannot be reshaped
        raise EvError(f"EcoFormer checkpoint does not match the model: {exc}", path=path) from exc
    try:
        model.load_state_dict(mapped, strict=True)
    except RuntimeError as exc:
        raise EvError(f"EcoFormer checkpoint does not match the model: {exc}", path=path) from exc
    return model
