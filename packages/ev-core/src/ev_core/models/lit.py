"""LIT (AAAI'22, arXiv 2105.14217): "Less is more" pay-less-attention vision transformers.

Two families, both registered with timm and with the official state-dict names:

* ``lit_ti`` -- PVT-based: per-stage learned absolute position embeddings, a cls token in stage 4
  (whose output feeds the head), LN eps 1e-6, 4×4/s4 conv + LN stem, DTM + GELU stems for stages
  2–4, MLP-only blocks in stages 1–2 and global MSA in stages 3–4.
* ``lit_s`` / ``lit_m`` / ``lit_b`` -- Swin-based: MLP-only stages 1–2, global MSA with a
  Swin-style relative-position bias over the **whole** stage map in stages 3–4 (so they are
  resolution-locked to ``img_size``), DTM between stages, average-pool head.

Official checkpoints load with ``timm.create_model("lit_s", pretrained=True,
pretrained_cfg_overlay=dict(file="lit_s.pth"))``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from timm.models import build_model_with_cfg, generate_default_cfgs
from timm.models._features import feature_take_indices
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ev_core.layers.attention import MultiHeadSelfAttention
from ev_core.layers.dtm import DeformableTokenMerging, DTMPath
from ev_core.layers.embed import LITBlock, PatchEmbed
from ev_core.layers.mlp import Mlp
from ev_core.layers.relpos import RelPosAttention
from ev_core.models._common import (
    HierarchicalLIT,
    build_stages,
    checkpoint_filter_fn,
    drop_path_rates,
    init_weights,
    per_stage,
    pretrained_cfg,
    to_2tuple,
)
from ev_core.registry import get_model_config, register_ev_model

__all__ = ["LIT", "LITConfig", "LITTi", "LITTiConfig", "lit_b", "lit_m", "lit_s", "lit_ti"]


@dataclass
class LITConfig:
    """Architecture of a Swin-based LIT variant (official keyword names)."""

    img_size: int = 224
    patch_size: int = 4
    in_chans: int = 3
    num_classes: int = 1000
    embed_dim: int = 96
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (3, 6, 12, 24)
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    has_msa: tuple[int, ...] = (0, 0, 1, 1)
    drop_path_rate: float = 0.2


@dataclass
class LITTiConfig:
    """Architecture of LIT-Ti (PVT-style keyword names)."""

    img_size: int = 224
    patch_size: int = 4
    in_chans: int = 3
    num_classes: int = 1000
    embed_dims: tuple[int, ...] = (64, 128, 320, 512)
    depths: tuple[int, ...] = (3, 4, 6, 3)
    num_heads: tuple[int, ...] = (1, 2, 5, 8)
    mlp_ratios: tuple[float, ...] = (8, 8, 4, 4)
    qkv_bias: bool = True
    has_msa: tuple[int, ...] = (0, 0, 1, 1)
    layernorm_eps: float = 1e-6
    drop_path_rate: float = 0.1


class LIT(HierarchicalLIT):
    """LIT-S/M/B (Swin layout, resolution-locked relative-position global attention).

    Args:
        img_size: input size the relative-position tables are built for (required at run time).
        patch_size: stem patch size.
        in_chans: image channels.
        num_classes: classes of the head (0 = no head).
        embed_dim: stage-1 channels ``C``.
        depths: blocks per stage.
        num_heads: heads per stage.
        mlp_ratio: MLP hidden ratio.
        qkv_bias: bias on the qkv projection.
        qk_scale: logit scale override.
        drop_rate: dropout after the patch embedding, in the MLPs and after attention.
        attn_drop_rate: attention dropout.
        drop_path_rate: stochastic depth, linear over blocks.
        has_msa: per stage, 1 = blocks have relative-position MSA, 0 = MLP-only blocks.
        patch_norm: LayerNorm after the patch embedding.
        ape: absolute position embedding (not used by LIT; only ``False`` is supported).
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
        has_msa: Sequence[int] = (0, 0, 1, 1),
        patch_norm: bool = True,
        ape: bool = False,
        use_checkpoint: bool = False,
        global_pool: str = "avg",
        dtm_path: DTMPath = "fast",
        fused_attn: bool | None = None,
    ) -> None:
        super().__init__()
        if ape:
            raise ValueError("ape=True (absolute position embedding) is not part of LIT-S/M/B")
        n = len(depths)
        depths = per_stage("depths", depths, n)
        num_heads = per_stage("num_heads", num_heads, n)
        has_msa = per_stage("has_msa", has_msa, n)
        self.img_size = to_2tuple(img_size)
        if self.img_size[0] % patch_size or self.img_size[1] % patch_size:
            raise ValueError(f"img_size {self.img_size} must be divisible by patch {patch_size}")
        dims = [embed_dim * 2**i for i in range(n)]
        res = [(self.img_size[0] // patch_size, self.img_size[1] // patch_size)]
        for _ in range(n - 1):
            res.append((res[-1][0] // 2, res[-1][1] // 2))
        self.embed_dim = embed_dim
        self.patch_embed = PatchEmbed(
            patch_size, in_chans, embed_dim, nn.LayerNorm if patch_norm else None, pad=False
        )
        self.pos_drop = nn.Dropout(drop_rate)

        def make_block(i: int, j: int, dp: float) -> nn.Module:
            dim = dims[i]
            attn = None
            if has_msa[i]:
                attn = RelPosAttention(
                    dim,
                    res[i],
                    num_heads[i],
                    qkv_bias=qkv_bias,
                    qk_scale=qk_scale,
                    attn_drop=attn_drop_rate,
                    proj_drop=drop_rate,
                    fused=fused_attn,
                )
            mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop_rate)
            return LITBlock(dim, mlp, attn, nn.LayerNorm, dp)

        self.layers = build_stages(dims, depths, drop_path_rate, make_block, dtm_path)
        self.norm = nn.LayerNorm(dims[-1])
        self._finish_init(num_classes, global_pool, dims, patch_size)
        self.set_grad_checkpointing(use_checkpoint)

    def _embed(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        if tuple(x.shape[-2:]) != self.img_size:
            raise ValueError(
                f"LIT-S/M/B are resolution-locked: built for {self.img_size}, got "
                f"{tuple(x.shape[-2:])} (create the model with img_size=...)"
            )
        return super()._embed(x)

    @torch.jit.ignore
    def no_weight_decay_keywords(self) -> set[str]:
        return {"relative_position_bias_table"}


class LITTi(nn.Module):
    """LIT-Ti (PVT layout). State-dict names: ``patch_embed{1..4}``, ``pos_embed{1..4}``,
    ``block{1..4}``, ``cls_token``, ``norm``, ``head``.

    Args:
        img_size: input size (the position embeddings are built for it; required at run time).
        patch_size: stage-1 patch size.
        in_chans: image channels.
        num_classes: classes of the head (0 = no head).
        embed_dims: channels per stage.
        num_heads: heads per stage.
        mlp_ratios: MLP hidden ratio per stage.
        qkv_bias: bias on the qkv projection.
        qk_scale: logit scale override.
        drop_rate: dropout after position embeddings, in MLPs and after attention.
        attn_drop_rate: attention dropout.
        drop_path_rate: stochastic depth, linear over blocks.
        depths: blocks per stage.
        has_msa: per stage, 1 = blocks with global MSA, 0 = MLP-only blocks.
        layernorm_eps: epsilon of the block and final LayerNorms.
        use_checkpoint: gradient checkpointing per block.
        global_pool: ``"token"`` (cls token) or ``"avg"`` (mean of the patch tokens).
        dtm_path: ``"fast"`` or ``"torchvision"`` deformable-conv path.
        fused_attn: ``True`` SDPA, ``False`` explicit attention, ``None`` global default.
    """

    def __init__(
        self,
        img_size: int | Sequence[int] = 224,
        patch_size: int = 4,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dims: Sequence[int] = (64, 128, 320, 512),
        num_heads: Sequence[int] = (1, 2, 5, 8),
        mlp_ratios: Sequence[float] = (8, 8, 4, 4),
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
        depths: Sequence[int] = (3, 4, 6, 3),
        has_msa: Sequence[int] = (0, 0, 1, 1),
        layernorm_eps: float = 1e-6,
        use_checkpoint: bool = False,
        global_pool: str = "token",
        dtm_path: DTMPath = "fast",
        fused_attn: bool | None = None,
    ) -> None:
        super().__init__()
        n = 4
        dims = per_stage("embed_dims", embed_dims, n)
        depths = per_stage("depths", depths, n)
        num_heads = per_stage("num_heads", num_heads, n)
        mlp_ratios = per_stage("mlp_ratios", mlp_ratios, n)
        has_msa = per_stage("has_msa", has_msa, n)
        if global_pool not in ("token", "avg"):
            raise ValueError(f"global_pool must be 'token' or 'avg', got {global_pool!r}")
        self.img_size = to_2tuple(img_size)
        if self.img_size[0] % (patch_size * 8) or self.img_size[1] % (patch_size * 8):
            raise ValueError(f"img_size {self.img_size} must be divisible by {patch_size * 8}")
        self.num_stages = n  # stages present (fewer after prune_intermediate_layers)
        self.cls_stage = n - 1  # the stage that carries the cls token
        self.embed_dims = dims
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.grad_checkpointing = use_checkpoint
        norm_layer = partial(nn.LayerNorm, eps=layernorm_eps)
        dpr = drop_path_rates(drop_path_rate, sum(depths))
        h, w = self.img_size[0] // patch_size, self.img_size[1] // patch_size
        self.resolutions: list[tuple[int, int]] = []
        k = 0
        for i in range(n):
            if i == 0:
                embed: nn.Module = PatchEmbed(patch_size, in_chans, dims[0], nn.LayerNorm)
            else:
                embed = DeformableTokenMerging(dims[i - 1], dims[i], path=dtm_path)
                h, w = h // 2, w // 2
            self.resolutions.append((h, w))
            extra = 1 if i == n - 1 else 0
            pos = nn.Parameter(torch.zeros(1, h * w + extra, dims[i]))
            nn.init.trunc_normal_(pos, std=0.02)
            blocks = []
            for j in range(depths[i]):
                attn = None
                if has_msa[i]:
                    attn = MultiHeadSelfAttention(
                        dims[i], num_heads[i], qkv_bias, qk_scale, attn_drop_rate, drop_rate,
                        fused_attn,
                    )  # fmt: skip
                mlp = Mlp(dims[i], int(dims[i] * mlp_ratios[i]), drop=drop_rate)
                blocks.append(LITBlock(dims[i], mlp, attn, norm_layer, dpr[k + j]))
            k += depths[i]
            setattr(self, f"patch_embed{i + 1}", embed)
            setattr(self, f"pos_embed{i + 1}", pos)
            setattr(self, f"block{i + 1}", nn.ModuleList(blocks))
        self.pos_drop = nn.Dropout(drop_rate)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dims[-1]))
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.norm: nn.Module = norm_layer(dims[-1])
        self.num_features = self.head_hidden_size = dims[-1]
        self.head: nn.Module = (
            nn.Linear(dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        )
        self.feature_info = [
            dict(num_chs=d, reduction=patch_size * 2**i, module=f"block{i + 1}")
            for i, d in enumerate(dims)
        ]
        for i in range(n):
            getattr(self, f"block{i + 1}").apply(init_weights)
        self.norm.apply(init_weights)
        self.head.apply(init_weights)

    # ----------------------------------------------------------------- timm model API
    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward pass (saves activation memory)."""
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Position embeddings and the cls token are excluded from weight decay."""
        return {n for n, _ in self.named_parameters() if n == "cls_token" or "pos_embed" in n}

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the head with a fresh ``num_classes`` one (0 = no head)."""
        if global_pool is not None:
            if global_pool not in ("token", "avg"):
                raise ValueError(f"global_pool must be 'token' or 'avg', got {global_pool!r}")
            self.global_pool = global_pool
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def _stage(self, i: int, x: Tensor, hw: tuple[int, int]) -> tuple[Tensor, tuple[int, int]]:
        """Stage ``i``: embed (stem conv or DTM) + position embedding + blocks.

        ``x``: images ``[B, 3, H, W]`` for stage 0, else tokens ``[B, N, C]``. The last stage
        returns ``[B, 1 + N, C]`` (cls token first).
        """
        embed = getattr(self, f"patch_embed{i + 1}")
        x, hw = embed(x) if i == 0 else embed(x, hw)
        if hw != self.resolutions[i]:
            raise ValueError(f"LIT-Ti is built for img_size {self.img_size}; stage {i + 1} got "
                             f"a {hw[0]}x{hw[1]} map instead of {self.resolutions[i]}")  # fmt: skip
        if i == self.cls_stage:
            x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        x = self.pos_drop(x + getattr(self, f"pos_embed{i + 1}"))
        # The cls-token stage has 1 + H·W tokens: its (global) attention gets no map size.
        block_hw = None if i == self.cls_stage else hw
        for blk in getattr(self, f"block{i + 1}"):
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(blk, x, block_hw, use_reentrant=False)
            else:
                x = blk(x, block_hw)
        return x, hw

    def forward_features(self, x: Tensor) -> Tensor:
        """``[B, 3, H, W]`` → normalised tokens ``[B, 1 + N, C]`` (cls token first)."""
        if tuple(x.shape[-2:]) != self.img_size:
            raise ValueError(
                f"LIT-Ti is built for img_size {self.img_size}, got {tuple(x.shape[-2:])}"
            )
        hw = self.img_size
        for i in range(self.num_stages):
            x, hw = self._stage(i, x, hw)
        return self.norm(x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """``[B, 1 + N, C]`` → logits (cls token, or mean of patch tokens with ``"avg"``)."""
        x = x[:, 0] if self.global_pool == "token" else x[:, 1:].mean(dim=1)
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        """``[B, 3, H, W]`` → logits ``[B, num_classes]``."""
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self,
        x: Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """Multi-scale stage outputs (cls token dropped), timm convention.

        Returns:
            The maps ``[B, C_i, H/2^(i+2), W/2^(i+2)]`` (or with the final tokens first).
        """
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        if tuple(x.shape[-2:]) != self.img_size:
            raise ValueError(
                f"LIT-Ti is built for img_size {self.img_size}, got {tuple(x.shape[-2:])}"
            )
        take_indices, max_index = feature_take_indices(self.num_stages, indices)
        last = self.cls_stage
        intermediates: list[Tensor] = []
        hw = self.img_size
        stop = max_index + 1 if stop_early else self.num_stages
        for i in range(stop):
            x, hw = self._stage(i, x, hw)
            if i in take_indices:
                y = self.norm(x) if norm and i == last else x
                y = y[:, 1:] if i == last else y
                y = y.reshape(y.shape[0], hw[0], hw[1], y.shape[-1])
                intermediates.append(y.permute(0, 3, 1, 2) if output_fmt == "NCHW" else y)
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the stages, norm and head not needed for the requested intermediates."""
        take_indices, max_index = feature_take_indices(self.num_stages, indices)
        for i in range(max_index + 1, self.num_stages):
            for name in (f"patch_embed{i + 1}", f"pos_embed{i + 1}", f"block{i + 1}"):
                delattr(self, name)
        prune_end = max_index < self.num_stages - 1
        self.num_stages = max_index + 1
        if prune_end:
            del self.cls_token
            self.num_features = self.head_hidden_size = self.embed_dims[max_index]
        if prune_norm or prune_end:
            self.norm = nn.Identity()
        if prune_head or prune_end:
            self.reset_classifier(0)
        return take_indices


def _build(cls: type[nn.Module], variant: str, pretrained: bool, **kwargs: Any) -> Any:
    args = {**dataclasses.asdict(get_model_config(variant)), **kwargs}
    return build_model_with_cfg(
        cls,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(feature_cls="getter", out_indices=(0, 1, 2, 3)),
        **args,
    )


default_cfgs = generate_default_cfgs(
    {
        "lit_ti.in1k": pretrained_cfg(first_conv="patch_embed1.proj", fixed_input_size=True),
        "lit_s.in1k": pretrained_cfg(fixed_input_size=True),
        "lit_m.in1k": pretrained_cfg(fixed_input_size=True),
        "lit_b.in1k": pretrained_cfg(fixed_input_size=True),
    }
)

_S = LITConfig()
_M = dataclasses.replace(_S, depths=(2, 2, 18, 2), drop_path_rate=0.3)
_B = dataclasses.replace(_M, embed_dim=128, num_heads=(4, 8, 16, 32), drop_path_rate=0.5)


@register_ev_model(LITTiConfig())
def lit_ti(pretrained: bool = False, **kwargs: Any) -> LITTi:
    """LIT-Ti (PVT-based): 19.9 M params, 3.6 GFLOPs (paper), 81.1 % top-1."""
    return _build(LITTi, "lit_ti", pretrained, **kwargs)


@register_ev_model(_S)
def lit_s(pretrained: bool = False, **kwargs: Any) -> LIT:
    """LIT-S (Swin-based): 28.0 M params, 4.1 GFLOPs (paper), 81.5 % top-1."""
    return _build(LIT, "lit_s", pretrained, **kwargs)


@register_ev_model(_M)
def lit_m(pretrained: bool = False, **kwargs: Any) -> LIT:
    """LIT-M (Swin-based): 49.4 M params, 8.6 GFLOPs (paper), 83.0 % top-1."""
    return _build(LIT, "lit_m", pretrained, **kwargs)


@register_ev_model(_B)
def lit_b(pretrained: bool = False, **kwargs: Any) -> LIT:
    """LIT-B (Swin-based): 87.3 M params, 15.0 GFLOPs (paper), 83.4 % top-1."""
    return _build(LIT, "lit_b", pretrained, **kwargs)
