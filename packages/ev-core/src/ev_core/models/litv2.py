"""LITv2 (NeurIPS'22, arXiv 2205.13213): HiLo attention + ConvFFN, registered with timm.

Layout and state-dict names equal the official ``ziplab/LITv2`` classification model, so its
checkpoints load through timm's standard path::

    import ev_core, timm
    model = timm.create_model("litv2_s", pretrained=True,
                              pretrained_cfg_overlay=dict(file="litv2_s.pth"))

* Patch embed 4×4/s4 + LN; stages 1–2: ConvFFN-only blocks (``local_ws = 0``); stages 3–4: HiLo
  (window ``local_ws[i]``, ``alpha``; ``local_ws = 1`` = global MSA) + ConvFFN; deformable token
  merging between stages; final LN, average pool, linear head. No positional embedding.
* Any input size: images are padded to a multiple of 4, HiLo pads its windows, DTM floors odd
  sizes.
* Everything runs on channels-last (NHWC) token maps; the DTM fast path runs in bf16;
  ``torch.compile(model, fullgraph=True)`` compiles without graph breaks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from timm.models import build_model_with_cfg, generate_default_cfgs
from torch import nn

from ev_core.layers.dtm import DTMPath
from ev_core.layers.embed import LITBlock, PatchEmbed
from ev_core.layers.hilo import HiLo
from ev_core.layers.mlp import ConvFFN
from ev_core.models._common import (
    HierarchicalLIT,
    build_stages,
    checkpoint_filter_fn,
    per_stage,
    pretrained_cfg,
    to_2tuple,
)
from ev_core.registry import register_ev_model

__all__ = ["LITv2", "LITv2Config", "litv2_b", "litv2_m", "litv2_s"]


@dataclass
class LITv2Config:
    """Architecture of a LITv2 variant (keyword names of the official constructor)."""

    img_size: int = 224
    patch_size: int = 4
    in_chans: int = 3
    num_classes: int = 1000
    embed_dim: int = 96
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (3, 6, 12, 24)
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    alpha: float = 0.9
    local_ws: tuple[int, ...] = (0, 0, 2, 1)
    drop_path_rate: float = 0.2


class LITv2(HierarchicalLIT):
    """LITv2 backbone / classifier.

    Args:
        img_size: nominal input size (pretrained config; any size is accepted at run time).
        patch_size: stem patch size.
        in_chans: image channels.
        num_classes: classes of the head (0 = no head).
        embed_dim: stage-1 channels ``C`` (stage ``i`` has ``C·2^i``).
        depths: blocks per stage.
        num_heads: heads per stage (used where ``local_ws > 0``).
        mlp_ratio: ConvFFN hidden ratio.
        qkv_bias: bias on the HiLo q/k/v projections.
        qk_scale: attention logit scale override.
        drop_rate: dropout after the patch embedding and inside ConvFFN.
        attn_drop_rate: accepted for compatibility; HiLo (like the official one) has none.
        drop_path_rate: stochastic depth, linear over blocks.
        alpha: HiLo Lo-Fi head fraction.
        local_ws: HiLo window size per stage; 0 = no attention in that stage, 1 = global MSA.
        patch_norm: LayerNorm after the patch embedding.
        ape: absolute position embedding (not used by LITv2; only ``False`` is supported).
        use_checkpoint: gradient checkpointing per block.
        global_pool: ``"avg"`` or ``""``.
        dtm_path: ``"fast"`` or ``"torchvision"`` deformable-conv path.
        fused_attn: ``True`` SDPA, ``False`` explicit attention, ``None`` global default.
    """

    def __init__(
        self,
        img_size: int | Sequence[int] = 224,
        patch_size: int = 4,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.2,
        alpha: float = 0.9,
        local_ws: Sequence[int] = (0, 0, 2, 1),
        patch_norm: bool = True,
        ape: bool = False,
        use_checkpoint: bool = False,
        global_pool: str = "avg",
        dtm_path: DTMPath = "fast",
        fused_attn: bool | None = None,
    ) -> None:
        super().__init__()
        if ape:
            raise ValueError("ape=True (absolute position embedding) is not part of LITv2")
        n = len(depths)
        depths = per_stage("depths", depths, n)
        num_heads = per_stage("num_heads", num_heads, n)
        local_ws = per_stage("local_ws", local_ws, n)
        self.img_size = to_2tuple(img_size)
        dims = [embed_dim * 2**i for i in range(n)]
        self.embed_dim = embed_dim
        self.patch_embed = PatchEmbed(
            patch_size, in_chans, embed_dim, nn.LayerNorm if patch_norm else None, pad=True
        )
        self.pos_drop = nn.Dropout(drop_rate)

        def make_block(i: int, j: int, dp: float) -> nn.Module:
            dim = dims[i]
            attn = None
            if local_ws[i] > 0:
                attn = HiLo(
                    dim,
                    num_heads[i],
                    qkv_bias=qkv_bias,
                    qk_scale=qk_scale,
                    attn_drop=attn_drop_rate,
                    proj_drop=drop_rate,
                    window_size=local_ws[i],
                    alpha=alpha,
                    fused=fused_attn,
                )
            mlp = ConvFFN(dim, int(dim * mlp_ratio), drop=drop_rate)
            return LITBlock(dim, mlp, attn, nn.LayerNorm, dp)

        self.layers = build_stages(dims, depths, drop_path_rate, make_block, dtm_path)
        self.norm = nn.LayerNorm(dims[-1])
        self._finish_init(num_classes, global_pool, dims, patch_size)
        self.set_grad_checkpointing(use_checkpoint)


def _create(variant: str, pretrained: bool, **kwargs: Any) -> LITv2:
    from ev_core.registry import get_model_config

    args = {**dataclasses.asdict(get_model_config(variant)), **kwargs}
    return build_model_with_cfg(
        LITv2,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(feature_cls="getter", out_indices=(0, 1, 2, 3)),
        **args,
    )


default_cfgs = generate_default_cfgs(
    {
        "litv2_s.in1k": pretrained_cfg(),
        "litv2_m.in1k": pretrained_cfg(),
        "litv2_b.in1k": pretrained_cfg(),
    }
)

_S = LITv2Config()
_M = dataclasses.replace(_S, depths=(2, 2, 18, 2), drop_path_rate=0.3)
_B = dataclasses.replace(_M, embed_dim=128, num_heads=(4, 8, 16, 32), drop_path_rate=0.5)


@register_ev_model(_S)
def litv2_s(pretrained: bool = False, **kwargs: Any) -> LITv2:
    """LITv2-S: C=96, depths (2,2,6,2), 27.8 M params, 3.7 GFLOPs (paper), 82.0 % top-1."""
    return _create("litv2_s", pretrained, **kwargs)


@register_ev_model(_M)
def litv2_m(pretrained: bool = False, **kwargs: Any) -> LITv2:
    """LITv2-M: C=96, depths (2,2,18,2), 48.8 M params, 7.5 GFLOPs (paper), 83.3 % top-1."""
    return _create("litv2_m", pretrained, **kwargs)


@register_ev_model(_B)
def litv2_b(pretrained: bool = False, **kwargs: Any) -> LITv2:
    """LITv2-B: C=128, depths (2,2,18,2), 86.5 M params, 13.2 GFLOPs (paper), 83.6 % top-1."""
    return _create("litv2_b", pretrained, **kwargs)
