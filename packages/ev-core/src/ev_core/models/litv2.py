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
from dataclasses import dataclass
from typing import Any

from timm.models import generate_default_cfgs
from torch import nn

from ev_core.layers.embed import LITBlock, PatchEmbed
from ev_core.layers.hilo import HiLo
from ev_core.layers.mlp import ConvFFN
from ev_core.models._builder import build_ev_model, pretrained_cfg, resolve_config
from ev_core.models._hierarchical import HierarchicalLIT
from ev_core.models._layers import build_stages, per_stage, to_2tuple
from ev_core.registry import register_ev_model

__all__ = ["LITv2", "LITv2Config", "litv2_b", "litv2_m", "litv2_s"]


@dataclass
class LITv2Config:
    """Architecture and options of a LITv2 model (keyword names of the official constructor).

    Attributes:
        img_size: nominal input size (pretrained config; any size is accepted at run time).
        patch_size: stem patch size.
        in_chans: image channels.
        num_classes: classes of the head (0 = no head).
        embed_dim: stage-1 channels ``C`` (stage ``i`` has ``C·2^i``).
        depths: blocks per stage.
        num_heads: heads per stage (used where ``local_ws > 0``).
        mlp_ratio: ConvFFN hidden ratio.
        qkv_bias: bias on the HiLo q/k/v projections.
        qk_scale: attention logit scale override (default ``head_dim ** -0.5``).
        drop_rate: dropout after the patch embedding and inside ConvFFN.
        drop_path_rate: stochastic depth, linear over blocks.
        alpha: HiLo Lo-Fi head fraction.
        local_ws: HiLo window size per stage; 0 = no attention in that stage, 1 = global MSA.
        patch_norm: LayerNorm after the patch embedding.
        use_checkpoint: gradient checkpointing per block.
        global_pool: ``"avg"`` or ``""``.
        dtm_path: deformable-conv path of the DTMs: ``"auto"`` (the fastest path measured for
            the device and dtype, :mod:`ev_core.layers.dtm`), ``"fast"`` or ``"torchvision"``.
        attn_backend: attention backend of every HiLo layer (``None``: the module-wide default,
            :func:`ev_core.layers.set_attention_backend`), settled at construction.
    """

    img_size: int | tuple[int, int] = 224
    patch_size: int = 4
    in_chans: int = 3
    num_classes: int = 1000
    embed_dim: int = 96
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (3, 6, 12, 24)
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    qk_scale: float | None = None
    drop_rate: float = 0.0
    drop_path_rate: float = 0.2
    alpha: float = 0.9
    local_ws: tuple[int, ...] = (0, 0, 2, 1)
    patch_norm: bool = True
    use_checkpoint: bool = False
    global_pool: str = "avg"
    dtm_path: str = "auto"
    attn_backend: str | None = None


class LITv2(HierarchicalLIT):
    """LITv2 backbone / classifier.

    Args:
        cfg: the architecture (default ``LITv2Config()``, i.e. LITv2-S).
        **overrides: fields of :class:`LITv2Config` to replace.
    """

    def __init__(self, cfg: LITv2Config | None = None, **overrides: Any) -> None:
        super().__init__()
        cfg = resolve_config(LITv2Config, cfg, overrides)
        self.cfg = cfg
        n = len(cfg.depths)
        num_heads = per_stage("num_heads", cfg.num_heads, n)
        local_ws = per_stage("local_ws", cfg.local_ws, n)
        self.img_size = to_2tuple(cfg.img_size)
        dims = [cfg.embed_dim * 2**i for i in range(n)]
        self.embed_dim = cfg.embed_dim
        norm = nn.LayerNorm if cfg.patch_norm else None
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.in_chans, cfg.embed_dim, norm, pad=True)
        self.pos_drop = nn.Dropout(cfg.drop_rate)

        def make_block(i: int, j: int, dp: float) -> nn.Module:
            dim = dims[i]
            attn = None
            if local_ws[i] > 0:
                attn = HiLo(
                    dim,
                    num_heads[i],
                    qkv_bias=cfg.qkv_bias,
                    qk_scale=cfg.qk_scale,
                    window_size=local_ws[i],
                    alpha=cfg.alpha,
                    backend=cfg.attn_backend,
                )
            mlp = ConvFFN(dim, int(dim * cfg.mlp_ratio), drop=cfg.drop_rate)
            return LITBlock(dim, mlp, attn, nn.LayerNorm, dp)

        self.layers = build_stages(dims, cfg.depths, cfg.drop_path_rate, make_block, cfg.dtm_path)
        self.norm = nn.LayerNorm(dims[-1])
        self._finish_init(cfg.num_classes, cfg.global_pool, dims, cfg.patch_size)
        self.set_grad_checkpointing(cfg.use_checkpoint)


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
    return build_ev_model(LITv2, "litv2_s", pretrained, **kwargs)


@register_ev_model(_M)
def litv2_m(pretrained: bool = False, **kwargs: Any) -> LITv2:
    """LITv2-M: C=96, depths (2,2,18,2), 48.8 M params, 7.5 GFLOPs (paper), 83.3 % top-1."""
    return build_ev_model(LITv2, "litv2_m", pretrained, **kwargs)


@register_ev_model(_B)
def litv2_b(pretrained: bool = False, **kwargs: Any) -> LITv2:
    """LITv2-B: C=128, depths (2,2,18,2), 86.5 M params, 13.2 GFLOPs (paper), 83.6 % top-1."""
    return build_ev_model(LITv2, "litv2_b", pretrained, **kwargs)
