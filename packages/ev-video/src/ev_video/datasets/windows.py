"""Training / inference windows over annotated videos as a torch ``Dataset``.

Every video is (optionally) resampled to ``fps`` and cut into windows of ``clip_len`` frames
(:func:`~ev_video.io.sliding_windows`); an item is one window: the decoded clip and the
segments inside it in *window frame units* (frame ``k`` of the window shows time
``(start + k) / fps`` of the sampled sequence). Segments cut by the window border are clipped
and kept when at least ``min_visible`` of them (and at least one frame) lies inside.

Each item opens its own :class:`~ev_video.io.VideoReader` (one per item, per worker: decoders
are never shared across processes). A file that cannot be decoded raises
:class:`~ev_video.errors.VideoDecodeError` naming it, or -- with ``on_error="skip"`` -- logs a
warning and yields ``None``, which :func:`collate_windows` drops.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from ev_video.datasets.annotations import TemporalAnnotations
from ev_video.errors import VideoDecodeError
from ev_video.io import VideoReader, Window, frames_to_clip, resample_indices, sliding_windows

__all__ = ["VideoWindow", "WindowDataset", "collate_windows", "find_video"]

log = logging.getLogger(__name__)

_EXTENSIONS = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".mpeg", ".mpg")


def find_video(folder: str | os.PathLike[str], video_id: str) -> Path:
    """The file of ``video_id`` in ``folder`` (any common extension).

    Raises:
        VideoDecodeError: no such file.
    """
    root = Path(folder)
    for ext in _EXTENSIONS:
        p = root / f"{video_id}{ext}"
        if p.is_file():
            return p
    raise VideoDecodeError(
        f"no video file for {video_id!r} ({'/'.join(_EXTENSIONS)})", root / video_id
    )


@dataclass(frozen=True)
class VideoWindow:
    """One item: ``clip_len`` sampled frames of a video starting at sampled frame ``start``."""

    video_id: str
    path: Path
    start: int
    frame_indices: tuple[int, ...]  # into the file, one per window frame
    fps: float  # of the sampled sequence
    valid: int  # window frames inside the video


class WindowDataset(Dataset):
    """Sliding windows over annotated videos.

    Args:
        video_dir: folder holding ``<video_id>.mp4`` (or another extension).
        annotations: the videos and segments (videos without segments are windows of background).
        clip_len: frames per window.
        overlap: fraction shared by consecutive windows (``stride`` wins when given).
        stride: frames between window starts.
        fps: resample every video to this rate (``None``: each video's own rate).
        size: ``(height, width)`` resize in the decoder (``None``: native).
        backend: ``"decord"`` or ``"pyav"``.
        min_visible: a cut segment is kept when this fraction of it (and at least one frame)
            lies in the window; 0 (default) keeps every visible part, so that no frame showing an
            action is labelled background.
        on_error: ``"raise"`` (default) or ``"skip"`` (log a warning, item becomes ``None``).
        mean: normalisation mean (``None``: scale to [0, 1] only).
        std: normalisation std.
        cache: keep every decoded window (uint8) in memory after its first read -- for small
            datasets trained for many epochs (the demo); off by default.
        jitter: random temporal crops for training: each read shifts the window start by a
            uniform offset in ``[-jitter, jitter]`` frames (clamped to the video), drawn from
            torch's RNG (seeded per epoch by the training engine).
    """

    def __init__(
        self,
        video_dir: str | os.PathLike[str],
        annotations: TemporalAnnotations,
        clip_len: int = 64,
        overlap: float = 0.5,
        stride: int | None = None,
        fps: float | None = None,
        size: tuple[int, int] | None = None,
        backend: str = "decord",
        min_visible: float = 0.0,
        on_error: str = "raise",
        mean: tuple[float, ...] | None = (0.5, 0.5, 0.5),
        std: tuple[float, ...] | None = (0.25, 0.25, 0.25),
        cache: bool = False,
        jitter: int = 0,
    ) -> None:
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self.video_dir = Path(video_dir)
        self.annotations = annotations
        self.classes = list(annotations.classes)
        self.clip_len = clip_len
        self.size = size
        self.backend = backend
        self.min_visible = min_visible
        self.on_error = on_error
        self.mean, self.std = mean, std
        self._cache: dict[tuple[str, int], Tensor] | None = {} if cache else None
        if jitter < 0:
            raise ValueError(f"jitter must be >= 0, got {jitter}")
        self.jitter = int(jitter)
        self._sampled: dict[str, np.ndarray] = {}
        self.windows: list[VideoWindow] = []
        self.skipped: list[str] = []
        for vid in sorted(annotations.videos):
            try:
                path = find_video(self.video_dir, vid)
                with VideoReader(path, backend=backend) as vr:
                    n, src_fps = len(vr), vr.fps
            except VideoDecodeError as exc:
                if on_error == "raise":
                    raise
                log.warning("skipping video %s: %s", vid, exc)
                self.skipped.append(vid)
                continue
            rate = float(fps) if fps else src_fps
            sampled = resample_indices(n, src_fps, rate) if fps else np.arange(n)
            self._sampled[vid] = sampled
            step = {"stride": stride} if stride is not None else {"overlap": overlap}
            for w in sliding_windows(len(sampled), clip_len, **step):
                idx = tuple(int(i) for i in sampled[w.indices])
                self.windows.append(VideoWindow(vid, path, w.start, idx, rate, w.valid))

    def __len__(self) -> int:
        return len(self.windows)

    def targets(self, window: VideoWindow) -> tuple[Tensor, Tensor]:
        """Segments inside a window: ``([n, 2] float window-frame (start, end), [n] long labels)``."""
        segs, labels = [], []
        for s in self.annotations.segments_of(window.video_id):
            a = s["t_start"] * window.fps - window.start
            b = s["t_end"] * window.fps - window.start
            lo, hi = max(a, 0.0), min(b, float(window.valid))
            if hi - lo < 1.0 or hi - lo < self.min_visible * (b - a):
                continue
            segs.append((lo, hi))
            labels.append(self.classes.index(s["label"]))
        return (
            torch.tensor(segs, dtype=torch.float32).reshape(-1, 2),
            torch.tensor(labels, dtype=torch.long),
        )

    def read_clip(self, window: VideoWindow) -> Tensor:
        """Decode a window: ``float [C, T, H, W]``."""
        return frames_to_clip(self._frames(window), self.mean, self.std)

    def _frames(self, window: VideoWindow) -> Tensor:
        key = (window.video_id, window.start)
        if self._cache is not None and key in self._cache:
            return self._cache[key]
        h, w = self.size if self.size is not None else (None, None)
        with VideoReader(window.path, backend=self.backend, width=w, height=h) as vr:
            frames = vr.get_batch(list(window.frame_indices))
        if self._cache is not None:
            self._cache[key] = frames
        return frames

    def _jittered(self, window: VideoWindow) -> VideoWindow:
        sampled = self._sampled[window.video_id]
        offset = int(torch.randint(-self.jitter, self.jitter + 1, ()))
        start = min(max(0, window.start + offset), max(0, len(sampled) - self.clip_len))
        w = Window(start, self.clip_len, len(sampled))
        idx = tuple(int(i) for i in sampled[w.indices])
        return VideoWindow(window.video_id, window.path, start, idx, window.fps, w.valid)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        window = self.windows[index]
        if self.jitter:
            window = self._jittered(window)
        try:
            clip = self.read_clip(window)
        except VideoDecodeError as exc:
            if self.on_error == "raise":
                raise
            log.warning("skipping window %d of %s: %s", window.start, window.video_id, exc)
            return None
        segments, labels = self.targets(window)
        return {
            "clip": clip,
            "segments": segments,
            "labels": labels,
            "video_id": window.video_id,
            "start": window.start,
            "fps": window.fps,
        }


def collate_windows(batch: list[dict[str, Any] | None]) -> dict[str, Any] | None:
    """Stack clips, keep per-item targets as lists; ``None`` items (skipped files) are dropped."""
    items = [b for b in batch if b is not None]
    if not items:
        return None
    return {
        "clip": torch.stack([b["clip"] for b in items]),
        "segments": [b["segments"] for b in items],
        "labels": [b["labels"] for b in items],
        "video_id": [b["video_id"] for b in items],
        "start": [b["start"] for b in items],
        "fps": [b["fps"] for b in items],
    }
