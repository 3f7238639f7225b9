"""STPT: Spatio-Temporal Pyramid Transformer for end-to-end temporal action detection.

No official code exists (ziplab/STPT is empty); this follows the paper's abstract (RGB only,
local window attention early, global attention late, a spatio-temporal pyramid feeding a
detection head) and SYSTEMS.md §4.1's recommended design: backbone
(:class:`~ev_video.models.backbone.STPTBackbone`), temporal pyramid and ActionFormer-style
anchor-free head (:mod:`ev_video.models.head`), Soft-NMS (:mod:`ev_video.models.postprocess`).

``create("stpt_s", num_classes=20)`` builds the recommended network (dims 64-512, depths
2-2-6-2, window (8, 6, 6) in stages 1-2, global in 3-4); ``stpt_tiny`` is a small variant for
CPU demos and tests. Both are timm models (``timm.create_model("stpt_s")`` after importing
``ev_video.models``) with their :class:`STPTConfig` in ``ev_core.get_model_config``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ev_core.errors import EvError
from ev_core.registry import get_model_config, register_ev_model
from ev_video.models.backbone import STPTBackbone
from ev_video.models.head import DetectionHead, TemporalPyramid, detection_loss, make_points
from ev_video.models.postprocess import decode_segments, soft_nms

__all__ = ["STPT", "STPTConfig", "STPTOutput", "count_video_flops", "create", "stpt_s", "stpt_tiny"]

Window = tuple[int, int, int] | None


@dataclass
class STPTConfig:
    """Architecture, loss and post-processing settings of an STPT model.

    Attributes:
        num_classes: action classes.
        in_chans: input channels (RGB).
        dims: channels per backbone stage.
        depths: blocks per stage.
        num_heads: heads per stage.
        windows: local ``(wt, wh, ww)`` window per stage; ``None`` = global attention.
        mlp_ratio: MLP hidden ratio.
        drop_path_rate: stochastic depth.
        stem_kernel: stem Conv3d kernel ``(t, h, w)``.
        stem_stride: stem Conv3d stride.
        pyramid_stages: how many of the last stages feed the temporal pyramid.
        spatial_pool: how a stage is pooled over space for the pyramid (``"max"``, ``"mean"``,
            ``"meanmax"``).
        fpn_dim: pyramid / head channels.
        regression_ranges: per pyramid level, ``(lo, hi)`` of a positive point's larger
            distance to the segment ends, in units of the level's stride (also sets the
            number of levels).
        head_layers: conv layers per head tower.
        center_radius: centre-sampling radius in strides.
        cls_prior: initial foreground probability.
        focal_alpha: focal loss alpha.
        focal_gamma: focal loss gamma.
        reg_weight: weight of the DIoU loss.
        pre_nms_topk: candidates per clip before NMS.
        max_segments: segments kept per video.
        min_score: candidates below are dropped.
        nms_sigma: Soft-NMS Gaussian sigma.
        multiclass_nms: suppress per class.
        attention_backend: ev-core attention backend (``None`` = default).
        grad_checkpointing: recompute backbone blocks in backward.
    """

    num_classes: int = 20
    in_chans: int = 3
    dims: tuple[int, ...] = (64, 128, 256, 512)
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (2, 4, 8, 16)
    windows: tuple[Window, ...] = ((8, 6, 6), (8, 6, 6), None, None)
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.1
    stem_kernel: tuple[int, int, int] = (3, 4, 4)
    stem_stride: tuple[int, int, int] = (2, 4, 4)
    pyramid_stages: int = 2
    spatial_pool: str = "max"
    fpn_dim: int = 256
    regression_ranges: tuple[tuple[float, float], ...] = (
        (0, 4), (4, 8), (8, 16), (16, 32), (32, 64), (64, 10000),
    )  # fmt: skip
    head_layers: int = 2
    center_radius: float = 1.5
    cls_prior: float = 0.01
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    reg_weight: float = 1.0
    pre_nms_topk: int = 2000
    max_segments: int = 200
    min_score: float = 0.001
    nms_sigma: float = 0.5
    multiclass_nms: bool = True
    attention_backend: str | None = None
    grad_checkpointing: bool = False


@dataclass
class STPTOutput:
    """Raw head outputs of a batch.

    Attributes:
        cls_logits: ``[B, P, K]``.
        distances: ``[B, P, 2]`` (stride units).
        points: ``[P, 4]`` (centre frame, stride, range lo, range hi).
    """

    cls_logits: Tensor
    distances: Tensor
    points: Tensor = field(repr=False)


class STPT(nn.Module):
    """Spatio-temporal pyramid transformer detector.

    Args:
        config: architecture and head settings.

    Forward: clips ``[B, 3, T, H, W]`` → :class:`STPTOutput`. :meth:`loss` and :meth:`predict`
    turn that into training losses and segments.
    """

    def __init__(self, config: STPTConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        if c.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {c.num_classes}")
        self.backbone = STPTBackbone(
            c.in_chans, c.dims, c.depths, c.num_heads, c.windows, c.mlp_ratio, c.drop_path_rate,
            c.stem_kernel, c.stem_stride, c.attention_backend, c.grad_checkpointing,
        )  # fmt: skip
        k = c.pyramid_stages
        self.pyramid = TemporalPyramid(
            c.dims[-k:],
            self.backbone.temporal_strides[-k:],
            c.fpn_dim,
            len(c.regression_ranges),
            c.spatial_pool,
        )
        self.head = DetectionHead(
            c.fpn_dim, c.num_classes, len(c.regression_ranges), c.head_layers, c.cls_prior
        )
        self.num_classes = c.num_classes
        self.apply(self._init)  # Linear layers only: the head's prior bias stays

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    @property
    def strides(self) -> list[int]:
        """Temporal stride (input frames) of each pyramid level."""
        return self.pyramid.strides

    def forward(self, x: Tensor) -> STPTOutput:
        """Args:
            x: ``[B, 3, T, H, W]`` normalised clips.

        Returns:
            :class:`STPTOutput`.
        """
        stages = self.backbone(x)
        feats = self.pyramid(stages[-self.config.pyramid_stages :])
        cls, dist = self.head(feats)
        points = make_points(
            [f.shape[-1] for f in feats], self.strides, self.config.regression_ranges, x.device
        )
        return STPTOutput(cls, dist, points)

    def loss(
        self, out: STPTOutput, segments: list[Tensor], labels: list[Tensor]
    ) -> dict[str, Tensor]:
        """Focal + DIoU losses (see :func:`ev_video.models.head.detection_loss`).

        Args:
            out: forward output of the batch.
            segments: per clip ``[G, 2]`` (start, end) in clip frames.
            labels: per clip ``[G]`` class ids.
        """
        c = self.config
        return detection_loss(
            out.cls_logits, out.distances, out.points, segments, labels,
            c.center_radius, c.focal_alpha, c.focal_gamma, c.reg_weight,
        )  # fmt: skip

    @torch.no_grad()
    def predict(
        self, x: Tensor, valid: list[float] | None = None, nms: bool = True
    ) -> list[dict[str, Tensor]]:
        """Segments of each clip (frames of the clip), Soft-NMS applied per clip when ``nms``.

        Returns:
            Per clip ``{"segments": [M, 2], "scores": [M], "labels": [M]}``.
        """
        out = self(x)
        return [
            self.postprocess(out, b, None if valid is None else valid[b], nms)
            for b in range(x.shape[0])
        ]

    def postprocess(
        self, out: STPTOutput, b: int, valid: float | None = None, nms: bool = True
    ) -> dict[str, Tensor]:
        """Decode clip ``b`` of a forward output (optionally with Soft-NMS)."""
        c = self.config
        seg, sc, lab = decode_segments(
            out.cls_logits[b],
            out.distances[b],
            out.points,
            valid=valid,
            min_score=c.min_score,
            topk=c.pre_nms_topk,
        )
        if nms:
            seg, sc, lab = soft_nms(
                seg, sc, lab, sigma=c.nms_sigma, min_score=c.min_score,
                max_segments=c.max_segments, multiclass=c.multiclass_nms,
            )  # fmt: skip
        return {"segments": seg, "scores": sc, "labels": lab}


def count_video_flops(
    model: nn.Module, input_size: tuple[int, int, int, int], batch_size: int = 1
) -> int:
    """FLOPs of one forward pass on ``[batch_size, *input_size]`` (``(C, T, H, W)``), eval, no grad.

    :func:`ev_core.flops.count_flops` with a clip-shaped sample; MACs = FLOPs / 2.
    """
    from ev_core.flops import count_flops

    return count_flops(model, input_size, batch_size=batch_size, sample_shape=True).flops


_TIMM_KWARGS = (
    "pretrained_cfg",
    "pretrained_cfg_overlay",
    "cache_dir",
    "features_only",
    "drop_rate",
)


def _build(name: str, pretrained: bool, **kwargs: Any) -> STPT:
    if pretrained:
        raise EvError(f"{name}: no pretrained STPT weights exist (ziplab/STPT is empty); train one")
    for k in _TIMM_KWARGS:
        kwargs.pop(k, None)
    cfg = get_model_config(name)
    known = {f.name for f in dataclasses.fields(cfg)}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise TypeError(f"{name}: unknown STPTConfig fields {unknown}; known: {sorted(known)}")
    return STPT(dataclasses.replace(cfg, **kwargs))


_S = STPTConfig()
_TINY = STPTConfig(
    dims=(32, 64, 128, 256),
    depths=(1, 1, 2, 1),
    num_heads=(1, 2, 4, 8),
    windows=((4, 4, 4), (4, 4, 4), None, None),
    mlp_ratio=2.0,
    drop_path_rate=0.0,
    fpn_dim=64,
    regression_ranges=((0, 4), (4, 8), (8, 16), (16, 10000)),
    head_layers=1,
)


@register_ev_model(_S)
def stpt_s(pretrained: bool = False, **kwargs: Any) -> STPT:
    """STPT-S (SYSTEMS.md §4.1 recommended design): dims 64-512, depths 2-2-6-2, window (8,6,6)."""
    return _build("stpt_s", pretrained, **kwargs)


@register_ev_model(_TINY)
def stpt_tiny(pretrained: bool = False, **kwargs: Any) -> STPT:
    """STPT-Tiny: dims 32-256, depths 1-1-2-1, window (4,4,4), 4 pyramid levels (CPU demos)."""
    return _build("stpt_tiny", pretrained, **kwargs)


def create(name: str, **kwargs: Any) -> STPT:
    """Build a registered STPT (``"stpt_tiny"``, ``"stpt_s"``); keyword arguments override
    :class:`STPTConfig` fields (``num_classes=...``, ``windows=...``).

    Raises:
        KeyError: unknown model name (lists the STPT models).
    """
    builders = {"stpt_s": stpt_s, "stpt_tiny": stpt_tiny}
    if name not in builders:
        raise KeyError(f"unknown STPT model {name!r}; choose one of {sorted(builders)}")
    return builders[name](**kwargs)
