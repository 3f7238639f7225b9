"""Synthetic action videos: real ``.mp4`` files with THUMOS-format annotations.

Each video shows a fixed textured background, a grey distractor dot drifting through the whole
video, and, in labelled time segments, one "action" at a time:

=========  ==============================================================
``Bounce``  a red square moving up and down
``Slide``   a green disk crossing the frame from left to right
``Pulse``   a blue disk growing and shrinking at a random place
``Spin``    a yellow bar rotating about a random centre
=========  ==============================================================

Classes differ in colour, shape and motion, so a small model learns them in seconds; the
segments are random (length, position, count), so localisation is not trivial. The files are
encoded with PyAV (libx264, B-frames on, a keyframe every ``gop`` frames, or MPEG-4 Part 2 when
the FFmpeg build lacks libx264), and the annotations are written both as per-class
``annotations/<Class>_<subset>.txt`` files and as ``annotations.json`` (ActivityNet style, with
duration and fps).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ev_core.errors import EvError, require
from ev_core.progress import progress
from ev_video.datasets.annotations import (
    TemporalAnnotations,
    VideoInfo,
    write_activitynet_json,
    write_class_txt,
)

__all__ = ["SYNTHETIC_CLASSES", "SyntheticVideoConfig", "generate_synthetic_videos", "render_video"]

SYNTHETIC_CLASSES: tuple[str, ...] = ("Bounce", "Pulse", "Slide", "Spin")


@dataclass
class SyntheticVideoConfig:
    """What :func:`generate_synthetic_videos` writes (a pure function of these fields).

    Attributes:
        num_videos: videos to write.
        num_frames: frames per video.
        fps: frame rate.
        height: frame height (even).
        width: frame width (even).
        num_classes: how many of :data:`SYNTHETIC_CLASSES` to use (1-4).
        max_actions: at most this many action segments per video (at least 1).
        min_action_s: shortest action in seconds.
        max_action_s: longest action in seconds.
        subset: subset name in the annotations (``"test"``, ``"val"``...).
        prefix: video-name prefix (names are ``<prefix>_<subset>_<0000k>``).
        gop: frames between keyframes.
        crf: x264 quality (lower = better).
        seed: random seed.
    """

    num_videos: int = 8
    num_frames: int = 128
    fps: float = 8.0
    height: int = 64
    width: int = 64
    num_classes: int = 4
    max_actions: int = 3
    min_action_s: float = 1.5
    max_action_s: float = 4.0
    subset: str = "test"
    prefix: str = "video"
    gop: int = 16
    crf: int = 18
    seed: int = 0

    def validate(self) -> None:
        """Raise ``ValueError`` on impossible settings."""
        if self.num_videos < 1 or self.num_frames < 2 or self.fps <= 0:
            raise ValueError("num_videos >= 1, num_frames >= 2 and fps > 0 are required")
        if self.height < 16 or self.width < 16 or self.height % 2 or self.width % 2:
            raise ValueError(f"height/width must be even and >= 16, got {self.height}x{self.width}")
        if not 1 <= self.num_classes <= len(SYNTHETIC_CLASSES):
            raise ValueError(f"num_classes must be in 1..{len(SYNTHETIC_CLASSES)}")
        if not 0 < self.min_action_s <= self.max_action_s:
            raise ValueError("0 < min_action_s <= max_action_s is required")
        if self.max_actions < 1:
            raise ValueError("max_actions must be >= 1")
        if self.min_action_s * self.fps < 2 or self.min_action_s > self.num_frames / self.fps:
            raise ValueError("min_action_s must span >= 2 frames and fit in the video")


def _segments(cfg: SyntheticVideoConfig, rng: np.random.Generator) -> list[tuple[int, int, int]]:
    """Non-overlapping ``(start_frame, end_frame_exclusive, class)`` triples."""
    n = cfg.num_frames
    want = int(rng.integers(1, cfg.max_actions + 1))
    out: list[tuple[int, int, int]] = []
    for _ in range(50 * want):
        if len(out) == want:
            break
        length = round(rng.uniform(cfg.min_action_s, cfg.max_action_s) * cfg.fps)
        length = max(2, min(length, n))
        start = int(rng.integers(0, n - length + 1))
        end = start + length
        if all(end + 2 <= s or start >= e + 2 for s, e, _ in out):
            out.append((start, end, int(rng.integers(0, cfg.num_classes))))
    return sorted(out)


def _background(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    a, b = rng.uniform(0.5, 2.0, size=2)
    base = 40 + 20 * np.sin(xx / w * math.pi * a) * np.cos(yy / h * math.pi * b)
    noise = rng.normal(0, 6, size=(h, w))
    img = np.clip(base + noise, 0, 255)[..., None] * np.array([0.9, 1.0, 1.1])
    return np.clip(img, 0, 255).astype(np.float32)


def _draw(frame: np.ndarray, mask: np.ndarray, color: tuple[int, int, int]) -> None:
    frame[mask] = color


def render_video(
    cfg: SyntheticVideoConfig, rng: np.random.Generator
) -> tuple[np.ndarray, list[tuple[int, int, int]]]:
    """Render one video.

    Returns:
        ``(frames uint8 [T, H, W, 3], segments)`` with segments as ``(start, end_exclusive, class)``
        frame triples.
    """
    h, w, n = cfg.height, cfg.width, cfg.num_frames
    bg = _background(h, w, rng)
    segs = _segments(cfg, rng)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    frames = np.empty((n, h, w, 3), dtype=np.uint8)
    dot = rng.uniform([0.2 * h, 0.2 * w], [0.8 * h, 0.8 * w])
    vel = rng.normal(0, 0.02 * min(h, w), size=2)
    size = min(h, w)
    params = [
        {
            "cy": rng.uniform(0.3, 0.7) * h,
            "cx": rng.uniform(0.3, 0.7) * w,
            "phase": rng.uniform(0, 2 * math.pi),
        }
        for _ in segs
    ]
    for t in range(n):
        frame = bg.copy()
        dot = dot + vel
        for d, lim in ((0, h), (1, w)):
            if not 0.1 * lim <= dot[d] <= 0.9 * lim:
                vel[d] = -vel[d]
                dot[d] = np.clip(dot[d], 0.1 * lim, 0.9 * lim)
        _draw(frame, (yy - dot[0]) ** 2 + (xx - dot[1]) ** 2 <= (0.06 * size) ** 2, (150, 150, 150))
        for (s, e, c), p in zip(segs, params, strict=True):
            if not s <= t < e:
                continue
            u = (t - s) / max(1, e - s - 1)  # progress 0..1 through the action
            name = SYNTHETIC_CLASSES[c]
            r = 0.12 * size
            if name == "Bounce":
                cy = h / 2 + 0.3 * h * math.sin(2 * math.pi * 2 * u + p["phase"])
                mask = (np.abs(yy - cy) <= r) & (np.abs(xx - p["cx"]) <= r)
                _draw(frame, mask, (220, 40, 40))
            elif name == "Slide":
                cx = 0.1 * w + 0.8 * w * u
                _draw(frame, (yy - p["cy"]) ** 2 + (xx - cx) ** 2 <= r**2, (40, 210, 60))
            elif name == "Pulse":
                rr = r * (0.6 + 0.8 * abs(math.sin(2 * math.pi * 1.5 * u)))
                _draw(frame, (yy - p["cy"]) ** 2 + (xx - p["cx"]) ** 2 <= rr**2, (50, 80, 230))
            else:  # Spin
                ang = 2 * math.pi * 1.5 * u + p["phase"]
                dy, dx = yy - p["cy"], xx - p["cx"]
                along = dx * math.cos(ang) + dy * math.sin(ang)
                across = -dx * math.sin(ang) + dy * math.cos(ang)
                _draw(
                    frame, (np.abs(along) <= 1.6 * r) & (np.abs(across) <= 0.35 * r), (230, 210, 40)
                )
        frames[t] = np.clip(frame, 0, 255).astype(np.uint8)
    return frames, segs


def write_mp4(
    path: str | os.PathLike[str], frames: np.ndarray, fps: float, gop: int = 16, crf: int = 18
) -> Path:
    """Encode ``uint8 [T, H, W, 3]`` RGB frames to an H.264 ``.mp4`` with PyAV.

    Raises:
        MissingDependencyError: PyAV is not installed (extra ``pyav``).
    """
    from fractions import Fraction

    av = require("av", "pyav", "ev-video", "writing synthetic .mp4 videos")
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.mp4")
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    rate = Fraction(fps).limit_denominator(1001)
    with av.open(str(tmp), mode="w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height = int(frames.shape[2]), int(frames.shape[1])
        stream.pix_fmt = "yuv420p"
        stream.codec_context.gop_size = gop
        if codec == "libx264":
            stream.options = {
                "crf": str(crf),
                "preset": "veryfast",
                "keyint_min": str(gop),
                "sc_threshold": "0",
            }
        for img in frames:
            for packet in stream.encode(
                av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")
            ):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    os.replace(tmp, path)
    return path


def generate_synthetic_videos(
    root: str | os.PathLike[str],
    config: SyntheticVideoConfig | None = None,
    *,
    overwrite: bool = False,
) -> TemporalAnnotations:
    """Write ``root/videos/*.mp4``, ``root/annotations/<Class>_<subset>.txt`` and ``root/annotations.json``.

    Args:
        root: output folder.
        config: what to generate (default :class:`SyntheticVideoConfig`).
        overwrite: replace an existing ``annotations.json`` there.

    Returns:
        The annotations (classes are the first ``num_classes`` of :data:`SYNTHETIC_CLASSES`).

    Raises:
        EvError: ``root`` already holds a dataset and ``overwrite`` is false.
    """
    cfg = config or SyntheticVideoConfig()
    cfg.validate()
    root = Path(root)
    if (root / "annotations.json").exists() and not overwrite:
        raise EvError("already holds a synthetic dataset (pass overwrite=True / --overwrite)", root)
    (root / "videos").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(cfg.seed)
    classes = list(SYNTHETIC_CLASSES[: cfg.num_classes])
    videos: dict[str, VideoInfo] = {}
    segments: list[dict[str, Any]] = []
    for k in progress(range(cfg.num_videos), desc="synthetic videos"):
        vid = f"{cfg.prefix}_{cfg.subset}_{k:07d}"
        frames, segs = render_video(cfg, rng)
        write_mp4(root / "videos" / f"{vid}.mp4", frames, cfg.fps, cfg.gop, cfg.crf)
        videos[vid] = VideoInfo(vid, cfg.subset, cfg.num_frames / cfg.fps, cfg.fps)
        for s, e, c in segs:
            segments.append({"video_id": vid, "label": SYNTHETIC_CLASSES[c],
                             "t_start": round(s / cfg.fps, 4), "t_end": round(e / cfg.fps, 4)})  # fmt: skip
    ann = TemporalAnnotations(videos=videos, segments=segments, classes=classes)
    write_class_txt(ann, root / "annotations", cfg.subset)
    write_activitynet_json(ann, root / "annotations.json")
    from ev_core.repro import dump_run_config

    dump_run_config(cfg, root)
    return ann
