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

LIT-Ti runs at any input size: its per-stage position embeddings are resampled (bicubic, like
timm's ``dynamic_img_size``) when a stage map differs from the one they were built for.
"""

import dataclasses
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from timm.layers import register_notrace_function
from timm.models import generate_default_cfgs
from timm.models._features import feature_take_indices
from torch import Tensor, nn

from ev_core.layers.attention import MultiHeadSelfAttention
from ev_core.layers.dtm import DeformableTokenMerging
from ev_core.layers.embed import LITBlock, PatchEmbed
from ev_core.layers.mlp import Mlp
from ev_core.layers.relpos import RelPosAttention
from ev_core.models._builder import build_ev_model, pretrained_cfg, resolve_config
from ev_core.models._hierarchical import HierarchicalLIT
from ev_core.models._layers import (
    build_stages,
    drop_path_rates,
    init_weights,
    per_stage,
    set_grad_checkpointing,
    to_2tuple,
)
from ev_core.registry import register_ev_model

__all__ = [
    "LIT",
    "LITConfig",
    "LITTi",
    "LITTiConfig",
    "lit_b",
    "lit_m",
    "lit_s",
    "lit_ti",
    "resample_pos_embed",
]


@dataclass
class LITConfig:
    """Architecture and options of a Swin-based LIT model (official keyword names).

    Attributes:
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
        use_checkpoint: gradient checkpointing per block.
        global_pool: ``"avg"`` or ``""``.
        dtm_path: ``"auto"`` (measured fastest), ``"fast"`` or ``"torchvision"``.
        attn_backend: attention backend of the MSA layers (``None``: module-wide default).
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
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.2
    has_msa: tuple[int, ...] = (0, 0, 1, 1)
    patch_norm: bool = True
    use_checkpoint: bool = False
    global_pool: str = "avg"
    dtm_path: str = "auto"
    attn_backend: str | None = None


@dataclass
class LITTiConfig:
    """Architecture and options of LIT-Ti (PVT-style keyword names).

    Attributes:
        img_size: input size the position embeddings are built for (others are resampled).
        patch_size: stage-1 patch size.
        in_chans: image channels.
        num_classes: classes of the head (0 = no head).
        embed_dims: channels per stage.
        depths: blocks per stage.
        num_heads: heads per stage.
        mlp_ratios: MLP hidden ratio per stage.
        qkv_bias: bias on the qkv projection.
        qk_scale: logit scale override.
        drop_rate: dropout after position embeddings, in MLPs and after attention.
        attn_drop_rate: attention dropout.
        drop_path_rate: stochastic depth, linear over blocks.
        has_msa: per stage, 1 = blocks with global MSA, 0 = MLP-only blocks.
        layernorm_eps: epsilon of the block and final LayerNorms.
        use_checkpoint: gradient checkpointing per block.
        global_pool: ``"token"`` (cls token) or ``"avg"`` (mean of the patch tokens).
        dtm_path: ``"auto"`` (measured fastest), ``"fast"`` or ``"torchvision"``.
        attn_backend: attention backend of the MSA layers (``None``: module-wide default).
    """

    img_size: int | tuple[int, int] = 224
    patch_size: int = 4
    in_chans: int = 3
    num_classes: int = 1000
    embed_dims: tuple[int, ...] = (64, 128, 320, 512)
    depths: tuple[int, ...] = (3, 4, 6, 3)
    num_heads: tuple[int, ...] = (1, 2, 5, 8)
    mlp_ratios: tuple[float, ...] = (8, 8, 4, 4)
    qkv_bias: bool = True
    qk_scale: float | None = None
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.1
    has_msa: tuple[int, ...] = (0, 0, 1, 1)
    layernorm_eps: float = 1e-6
    use_checkpoint: bool = False
    global_pool: str = "token"
    dtm_path: str = "auto"
    attn_backend: str | None = None


class LIT(HierarchicalLIT):
    """LIT-S/M/B (Swin layout, resolution-locked relative-position global attention).

    Args:
        cfg: the architecture (default ``LITConfig()``, i.e. LIT-S).
        **overrides: fields of :class:`LITConfig` to replace.
    """

    def __init__(self, cfg: LITConfig | None = None, **overrides: Any) -> None:
        super().__init__()
        cfg = resolve_config(LITConfig, cfg, overrides)
        self.cfg = cfg
        n = len(cfg.depths)
        num_heads = per_stage("num_heads", cfg.num_heads, n)
        has_msa = per_stage("has_msa", cfg.has_msa, n)
        self.img_size = to_2tuple(cfg.img_size)
        p = cfg.patch_size
        if self.img_size[0] % p or self.img_size[1] % p:
            raise ValueError(f"img_size {self.img_size} must be divisible by patch {p}")
        dims = [cfg.embed_dim * 2**i for i in range(n)]
        res = [(self.img_size[0] // p, self.img_size[1] // p)]
        for _ in range(n - 1):
            res.append((res[-1][0] // 2, res[-1][1] // 2))
        self.embed_dim = cfg.embed_dim
        norm = nn.LayerNorm if cfg.patch_norm else None
        self.patch_embed = PatchEmbed(
            p, cfg.in_chans, cfg.embed_dim, norm, img_size=self.img_size, model="LIT-S/M/B"
        )
        self.pos_drop = nn.Dropout(cfg.drop_rate)

        def make_block(i: int, j: int, dp: float) -> nn.Module:
            dim = dims[i]
            attn = None
            if has_msa[i]:
                attn = RelPosAttention(
                    dim,
                    res[i],
                    num_heads[i],
                    qkv_bias=cfg.qkv_bias,
                    qk_scale=cfg.qk_scale,
                    attn_drop=cfg.attn_drop_rate,
                    proj_drop=cfg.drop_rate,
                    backend=cfg.attn_backend,
                )
            mlp = Mlp(dim, int(dim * cfg.mlp_ratio), drop=cfg.drop_rate)
            return LITBlock(dim, mlp, attn, nn.LayerNorm, dp)

        self.layers = build_stages(dims, cfg.depths, cfg.drop_path_rate, make_block, cfg.dtm_path)
        self.norm = nn.LayerNorm(dims[-1])
        self._finish_init(cfg.num_classes, cfg.global_pool, dims, p)
        self.set_grad_checkpointing(cfg.use_checkpoint)


@register_notrace_function
def resample_pos_embed(
    pos: Tensor, grid: tuple[int, int], hw: tuple[int, int], num_prefix: int
) -> Tensor:
    """Position embeddings of a ``grid`` map resampled (bicubic) to an ``hw`` map.

    Args:
        pos: ``[1, num_prefix + gh·gw, C]`` (prefix tokens, e.g. cls, first; kept as they are).
        grid: ``(gh, gw)`` the embeddings were built for.
        hw: ``(H, W)`` wanted.
        num_prefix: leading non-spatial tokens.

    Returns:
        ``[1, num_prefix + H·W, C]`` (``pos`` itself when ``hw == grid``).
    """
    if hw[0] == grid[0] and hw[1] == grid[1]:
        return pos
    prefix, spatial = pos[:, :num_prefix], pos[:, num_prefix:]
    C = spatial.shape[-1]
    m = spatial.reshape(1, grid[0], grid[1], C).permute(0, 3, 1, 2).float()
    m = F.interpolate(m, size=[hw[0], hw[1]], mode="bicubic", align_corners=False)
    spatial = m.permute(0, 2, 3, 1).reshape(1, hw[0] * hw[1], C).to(pos.dtype)
    return torch.cat((prefix, spatial), dim=1)


class LITTi(nn.Module):
    """LIT-Ti (PVT layout), any input size. State-dict names: ``patch_embed{1..4}``,
    ``pos_embed{1..4}``, ``block{1..4}``, ``cls_token``, ``norm``, ``head``.

    Args:
        cfg: the architecture (default ``LITTiConfig()``).
        **overrides: fields of :class:`LITTiConfig` to replace.
    """

    if TYPE_CHECKING:  # set with setattr below; declared for type checkers only
        patch_embed1: PatchEmbed
        patch_embed2: DeformableTokenMerging
        patch_embed3: DeformableTokenMerging
        patch_embed4: DeformableTokenMerging
        pos_embed1: nn.Parameter
        pos_embed2: nn.Parameter
        pos_embed3: nn.Parameter
        pos_embed4: nn.Parameter
        block1: nn.ModuleList
        block2: nn.ModuleList
        block3: nn.ModuleList
        block4: nn.ModuleList

    def __init__(self, cfg: LITTiConfig | None = None, **overrides: Any) -> None:
        super().__init__()
        cfg = resolve_config(LITTiConfig, cfg, overrides)
        self.cfg = cfg
        n = 4
        dims = per_stage("embed_dims", cfg.embed_dims, n)
        depths = per_stage("depths", cfg.depths, n)
        num_heads = per_stage("num_heads", cfg.num_heads, n)
        mlp_ratios = per_stage("mlp_ratios", cfg.mlp_ratios, n)
        has_msa = per_stage("has_msa", cfg.has_msa, n)
        if cfg.global_pool not in ("token", "avg"):
            raise ValueError(f"global_pool must be 'token' or 'avg', got {cfg.global_pool!r}")
        self.img_size = to_2tuple(cfg.img_size)
        p = cfg.patch_size
        if self.img_size[0] % (p * 8) or self.img_size[1] % (p * 8):
            raise ValueError(f"img_size {self.img_size} must be divisible by {p * 8}")
        self.num_stages = n  # stages present (fewer after prune_intermediate_layers)
        self.embed_dims = dims
        self.num_classes = cfg.num_classes
        self.global_pool = cfg.global_pool
        norm_layer = partial(nn.LayerNorm, eps=cfg.layernorm_eps)
        dpr = drop_path_rates(cfg.drop_path_rate, sum(depths))
        h, w = self.img_size[0] // p, self.img_size[1] // p
        self.resolutions: list[tuple[int, int]] = []  # the map each pos_embed is built for
        k = 0
        for i in range(n):
            if i == 0:
                embed: nn.Module = PatchEmbed(p, cfg.in_chans, dims[0], nn.LayerNorm, pad=True)
            else:
                embed = DeformableTokenMerging(dims[i - 1], dims[i], path=cfg.dtm_path)
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
                        dims[i], num_heads[i], cfg.qkv_bias, cfg.qk_scale, cfg.attn_drop_rate,
                        cfg.drop_rate, backend=cfg.attn_backend,
                    )  # fmt: skip
                mlp = Mlp(dims[i], int(dims[i] * mlp_ratios[i]), drop=cfg.drop_rate)
                blocks.append(LITBlock(dims[i], mlp, attn, norm_layer, dpr[k + j]))
            k += depths[i]
            setattr(self, f"patch_embed{i + 1}", embed)
            setattr(self, f"pos_embed{i + 1}", pos)
            setattr(self, f"block{i + 1}", nn.ModuleList(blocks))
        self.pos_drop = nn.Dropout(cfg.drop_rate)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dims[-1]))
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.norm: nn.Module = norm_layer(dims[-1])
        self.num_features = self.head_hidden_size = dims[-1]
        self.head: nn.Module = (
            nn.Linear(dims[-1], cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        )
        self.feature_info = [
            dict(num_chs=d, reduction=p * 2**i, module=f"block{i + 1}") for i, d in enumerate(dims)
        ]
        for i in range(n):
            getattr(self, f"block{i + 1}").apply(init_weights)
        self.norm.apply(init_weights)
        self.head.apply(init_weights)
        self.set_grad_checkpointing(cfg.use_checkpoint)

    # ----------------------------------------------------------------- timm model API
    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward pass (saves activation memory)."""
        set_grad_checkpointing(self, enable)

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

    # ----------------------------------------------------------------- forward
    def _add_pos(self, x: Tensor, hw: tuple[int, int], i: int, pos: Tensor) -> Tensor:
        """Position embedding (after the cls token in the last stage) of stage ``i``."""
        cls = i == 3
        if cls:
            x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        return self.pos_drop(x + resample_pos_embed(pos, self.resolutions[i], hw, 1 if cls else 0))

    def _to_map(self, x: Tensor, hw: tuple[int, int], i: int, norm: bool, nchw: bool) -> Tensor:
        y = self.norm(x) if norm else x
        y = y[:, 1:] if i == 3 else y
        y = y.reshape(y.shape[0], hw[0], hw[1], y.shape[-1])
        return y.permute(0, 3, 1, 2) if nchw else y

    def _forward_stages(
        self, x: Tensor, take: list[int], stop: int, norm: bool, nchw: bool
    ) -> tuple[Tensor, list[Tensor]]:
        """Stages ``0 .. stop-1``; the maps of the stages in ``take`` (cls token dropped)."""
        feats: list[Tensor] = []
        x, hw = self.patch_embed1(x)
        x = self._add_pos(x, hw, 0, self.pos_embed1)
        for blk1 in self.block1:
            x = blk1(x, hw)
        if 0 in take:
            feats.append(self._to_map(x, hw, 0, False, nchw))
        if stop > 1:
            x, hw = self.patch_embed2(x, hw)
            x = self._add_pos(x, hw, 1, self.pos_embed2)
            for blk2 in self.block2:
                x = blk2(x, hw)
            if 1 in take:
                feats.append(self._to_map(x, hw, 1, False, nchw))
        if stop > 2:
            x, hw = self.patch_embed3(x, hw)
            x = self._add_pos(x, hw, 2, self.pos_embed3)
            for blk3 in self.block3:
                x = blk3(x, hw)
            if 2 in take:
                feats.append(self._to_map(x, hw, 2, False, nchw))
        if stop > 3:
            x, hw = self.patch_embed4(x, hw)
            x = self._add_pos(x, hw, 3, self.pos_embed4)
            for blk4 in self.block4:  # 1 + H·W tokens: the (global) attention gets no map size
                x = blk4(x, None)
            if 3 in take:
                feats.append(self._to_map(x, hw, 3, norm, nchw))
        return x, feats

    def forward_features(self, x: Tensor) -> Tensor:
        """``[B, 3, H, W]`` → normalised tokens ``[B, 1 + N, C]`` (cls token first)."""
        x, _ = self._forward_stages(x, [], self.num_stages, False, True)
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
        take_indices, max_index = feature_take_indices(self.num_stages, indices)
        stop = max_index + 1 if stop_early else self.num_stages
        x, feats = self._forward_stages(x, list(take_indices), stop, norm, output_fmt == "NCHW")
        if intermediates_only:
            return feats
        return self.norm(x), feats

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


default_cfgs = generate_default_cfgs(
    {
        "lit_ti.in1k": pretrained_cfg(first_conv="patch_embed1.proj"),
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
    return build_ev_model(LITTi, "lit_ti", pretrained, **kwargs)


@register_ev_model(_S)
def lit_s(pretrained: bool = False, **kwargs: Any) -> LIT:
    """LIT-S (Swin-based): 28.0 M params, 4.1 GFLOPs (paper), 81.5 % top-1."""
    return build_ev_model(LIT, "lit_s", pretrained, **kwargs)


@register_ev_model(_M)
def lit_m(pretrained: bool = False, **kwargs: Any) -> LIT:
    """LIT-M (Swin-based): 49.4 M params, 8.6 GFLOPs (paper), 83.0 % top-1."""
    return build_ev_model(LIT, "lit_m", pretrained, **kwargs)


@register_ev_model(_B)
def lit_b(pretrained: bool = False, **kwargs: Any) -> LIT:
    """LIT-B (Swin-based): 87.3 M params, 15.0 GFLOPs (paper), 83.4 % top-1."""
    return build_ev_model(LIT, "lit_b", pretrained, **kwargs)
