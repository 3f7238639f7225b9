"""Temporal action detection metrics: ActivityNet-style detection mAP and proposal AR@AN."""

from ev_video.evaluation.detection import (
    THUMOS_TIOU_THRESHOLDS,
    DetectionResult,
    average_precision_detection,
    evaluate_detections,
    interpolated_average_precision,
)
from ev_video.evaluation.proposals import ProposalResult, evaluate_proposals
from ev_video.evaluation.segments import segment_iou

__all__ = [
    "THUMOS_TIOU_THRESHOLDS",
    "DetectionResult",
    "ProposalResult",
    "average_precision_detection",
    "evaluate_detections",
    "evaluate_proposals",
    "interpolated_average_precision",
    "segment_iou",
]
