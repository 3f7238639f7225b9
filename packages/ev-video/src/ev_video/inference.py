"""Sliding-window detection over whole videos, saving/loading trained detectors.

A video is (optionally) resampled to ``clip.fps``, cut into windows of ``clip.clip_len``
frames with ``clip.overlap`` (0.5: OpenTAD's end-to-end testing), decoded one batch of windows
at a time (memory stays flat however long the video), and every window's candidates get
Soft-NMS; the windows' segments are then mapped to seconds, merged, and a final Soft-NMS
removes the duplicates of overlapping windows.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ev_core.checkpoint import load_checkpoint, save_checkpoint
from ev_core.errors import EvError
from ev_core.progress import progress
from ev_video.datasets.annotations import TemporalAnnotations
from ev_video.datasets.windows import find_video
from ev_video.evaluation import DetectionResult, evaluate_detections
from ev_video.io import VideoReader, frames_to_clip, resample_indices, sliding_windows
from ev_video.models import STPT, STPTConfig, soft_nms

__all__ = [
    "ClipConfig",
    "detect_video",
    "detect_videos",
    "evaluate_detector",
    "load_detector",
    "save_detector",
]


@dataclass
class ClipConfig:
    """How videos become model input (the same in training and inference).

    Attributes:
        clip_len: frames per window.
        overlap: overlap of consecutive windows (training and testing).
        fps: resample videos to this rate (``None``: native).
        height: decode at this height (``None``: native; give width too).
        width: decode at this width.
        mean: normalisation mean (0-1 units).
        std: normalisation std.
        backend: ``"decord"`` or ``"pyav"``.
    """

    clip_len: int = 64
    overlap: float = 0.5
    fps: float | None = None
    height: int | None = None
    width: int | None = None
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.25, 0.25, 0.25)
    backend: str = "decord"

    @property
    def size(self) -> tuple[int, int] | None:
        """``(height, width)`` or ``None``."""
        return (self.height, self.width) if self.height and self.width else None


def save_detector(
    path: str | os.PathLike[str], model: STPT, classes: list[str], clip: ClipConfig
) -> Path:
    """Write ``path`` (``.safetensors``) and its JSON (model config, classes, clip config)."""
    return save_checkpoint(
        path,
        model.state_dict(),
        config={"model": model.config, "classes": list(classes), "clip": clip},
    )


def load_detector(
    path: str | os.PathLike[str], map_location: str = "cpu"
) -> tuple[STPT, list[str], ClipConfig]:
    """Rebuild a detector written by :func:`save_detector` (eval mode).

    Raises:
        EvError: the file lacks the JSON describing the model.
    """
    state, info = load_checkpoint(path, map_location)
    cfg = info.get("config") or {}
    if not isinstance(cfg, dict) or "model" not in cfg or "classes" not in cfg:
        raise EvError("not an ev-video detector (its .json lacks 'model'/'classes')", path)
    m = dict(cfg["model"])
    m["windows"] = tuple(None if w is None else tuple(w) for w in m["windows"])
    m["regression_ranges"] = tuple(tuple(r) for r in m["regression_ranges"])
    for k in ("dims", "depths", "num_heads", "stem_kernel", "stem_stride"):
        m[k] = tuple(m[k])
    model = STPT(STPTConfig(**m))
    model.load_state_dict(state)
    c = dict(cfg.get("clip") or {})
    for k in ("mean", "std"):
        if k in c:
            c[k] = tuple(c[k])
    return model.eval(), list(cfg["classes"]), ClipConfig(**c)


@torch.no_grad()
def detect_video(
    model: STPT,
    path: str | os.PathLike[str],
    classes: list[str],
    clip: ClipConfig,
    *,
    batch_size: int = 4,
    device: str | torch.device = "cpu",
    video_id: str | None = None,
    show_progress: bool = False,
) -> list[dict[str, Any]]:
    """Detect actions in one video.

    Args:
        model: a trained STPT (put in eval mode here).
        path: the video file.
        classes: label of each class id.
        clip: windowing and decoding settings (those the model was trained with).
        batch_size: windows per forward.
        device: where the model runs.
        video_id: ``video_id`` of the records (default: the file stem).
        show_progress: a progress bar over windows.

    Returns:
        Records ``{"video_id", "label", "score", "t_start", "t_end"}`` (seconds), best first.

    Raises:
        VideoDecodeError: the file cannot be decoded.
    """
    model.eval().to(device)
    vid = video_id or Path(path).stem
    with VideoReader(path, backend=clip.backend, width=clip.width, height=clip.height) as vr:
        n, src_fps = len(vr), vr.fps
        rate = float(clip.fps) if clip.fps else src_fps
        sampled = resample_indices(n, src_fps, rate) if clip.fps else np.arange(n)
        windows = sliding_windows(len(sampled), clip.clip_len, overlap=clip.overlap)
        segs, scores, labels = [], [], []
        batches = [windows[i : i + batch_size] for i in range(0, len(windows), batch_size)]
        for group in progress(batches, desc=f"detect {vid}") if show_progress else batches:
            frames = torch.stack([vr.get_batch(sampled[w.indices].tolist()) for w in group])
            x = frames_to_clip(frames, clip.mean, clip.std).to(device)
            preds = model.predict(x, valid=[float(w.valid) for w in group])
            for w, p in zip(group, preds, strict=True):
                segs.append((p["segments"].cpu() + w.start) / rate)
                scores.append(p["scores"].cpu())
                labels.append(p["labels"].cpu())
    if not segs:
        return []
    c = model.config
    seg, sc, lab = soft_nms(
        torch.cat(segs), torch.cat(scores), torch.cat(labels), sigma=c.nms_sigma,
        min_score=c.min_score, max_segments=c.max_segments, multiclass=c.multiclass_nms,
    )  # fmt: skip
    duration = n / src_fps
    return [
        {
            "video_id": vid,
            "label": classes[int(l_)],
            "score": float(s_),
            "t_start": float(a.clamp(0, duration)),
            "t_end": float(b.clamp(0, duration)),
        }
        for (a, b), s_, l_ in zip(seg, sc, lab, strict=True)
    ]


def detect_videos(
    model: STPT,
    video_dir: str | os.PathLike[str],
    video_ids: Iterable[str],
    classes: list[str],
    clip: ClipConfig,
    **kwargs: Any,
) -> list[dict[str, Any]]:
    """:func:`detect_video` over ``video_dir/<video_id>.*`` for every id (progress bar)."""
    out: list[dict[str, Any]] = []
    for vid in progress(list(video_ids), desc="detect"):
        out.extend(
            detect_video(model, find_video(video_dir, vid), classes, clip, video_id=vid, **kwargs)
        )
    return out


def evaluate_detector(
    model: STPT,
    video_dir: str | os.PathLike[str],
    annotations: TemporalAnnotations,
    classes: list[str],
    clip: ClipConfig,
    tiou_thresholds: tuple[float, ...] = (0.3, 0.4, 0.5, 0.6, 0.7),
    **kwargs: Any,
) -> tuple[DetectionResult, list[dict[str, Any]]]:
    """Detect on every annotated video and score the result (ActivityNet mAP).

    Returns:
        ``(result, predictions)``.
    """
    preds = detect_videos(model, video_dir, sorted(annotations.videos), classes, clip, **kwargs)
    return evaluate_detections(annotations.segments, preds, tiou_thresholds), preds
