"""STPT temporal action detection models (registered with timm and ev-core)."""

from ev_video.models.attention import WindowAttention3D, window_partition_3d, window_reverse_3d
from ev_video.models.backbone import STPTBackbone, STPTBlock
from ev_video.models.head import (
    DetectionHead,
    TemporalPyramid,
    assign_targets,
    detection_loss,
    diou_loss_1d,
)
from ev_video.models.postprocess import decode_segments, pairwise_tiou, soft_nms
from ev_video.models.stpt import (
    STPT,
    STPTConfig,
    STPTOutput,
    count_video_flops,
    create,
    stpt_s,
    stpt_tiny,
)

__all__ = [
    "STPT",
    "DetectionHead",
    "STPTBackbone",
    "STPTBlock",
    "STPTConfig",
    "STPTOutput",
    "TemporalPyramid",
    "WindowAttention3D",
    "assign_targets",
    "count_video_flops",
    "create",
    "decode_segments",
    "detection_loss",
    "diou_loss_1d",
    "pairwise_tiou",
    "soft_nms",
    "stpt_s",
    "stpt_tiny",
    "window_partition_3d",
    "window_reverse_3d",
]
