"""Which frames make a clip, and turning decoded frames into model input.

All samplers return integer frame indices (``numpy.int64``) valid for a video of
``num_frames`` frames; a clip longer than the video repeats the last frame (the model always
sees ``clip_len`` frames).

* :func:`uniform_indices` -- ``clip_len`` frames spread evenly over the whole video.
* :func:`sliding_windows` -- dense windows of ``window`` frames every ``stride`` frames (or a
  given ``overlap``), the last one aligned so that every frame is covered.
* :func:`random_crop_indices` -- a random temporal crop (training).
* :func:`resample_indices` -- the frames nearest to a target frame rate.
* :func:`frames_to_clip` -- ``uint8 [T, H, W, C]`` → normalised ``float [C, T, H, W]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Window",
    "frames_to_clip",
    "random_crop_indices",
    "resample_indices",
    "sliding_windows",
    "uniform_indices",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _check_positive(**values: int) -> None:
    for name, v in values.items():
        if int(v) <= 0:
            raise ValueError(f"{name} must be positive, got {v}")


def uniform_indices(num_frames: int, clip_len: int) -> np.ndarray:
    """``clip_len`` indices evenly spaced from the first to the last frame (rounded).

    Returns:
        ``[clip_len]`` int64, non-decreasing.
    """
    _check_positive(num_frames=num_frames, clip_len=clip_len)
    return np.rint(np.linspace(0, num_frames - 1, clip_len)).astype(np.int64)


@dataclass(frozen=True)
class Window:
    """One sliding window: frames ``start .. start + length - 1`` (clamped to the video).

    Attributes:
        start: first frame (in the sampled frame sequence).
        length: frames in the window (the model's clip length).
        num_frames: frames of the video (indices past the end repeat the last frame).
    """

    start: int
    length: int
    num_frames: int

    @property
    def indices(self) -> np.ndarray:
        """``[length]`` int64 indices, the tail clamped to the last frame."""
        return np.minimum(np.arange(self.start, self.start + self.length), self.num_frames - 1)

    @property
    def valid(self) -> int:
        """Frames of the window that lie inside the video."""
        return max(0, min(self.length, self.num_frames - self.start))


def sliding_windows(
    num_frames: int, window: int, stride: int | None = None, overlap: float | None = None
) -> list[Window]:
    """Dense windows covering every frame.

    Args:
        num_frames: frames in the video.
        window: frames per window.
        stride: frames between window starts; exclusive with ``overlap``.
        overlap: fraction in ``[0, 1)`` shared by consecutive windows (stride =
            ``round(window * (1 - overlap))``). Default: no overlap.

    Returns:
        Windows starting at ``0, stride, 2·stride, ...``; when the last one would end before the
        video does, one more window ends exactly at the last frame. A video shorter than a window
        gives one window (padded with the last frame).
    """
    _check_positive(num_frames=num_frames, window=window)
    if stride is not None and overlap is not None:
        raise ValueError("give stride or overlap, not both")
    if overlap is not None:
        if not 0.0 <= overlap < 1.0:
            raise ValueError(f"overlap must be in [0, 1), got {overlap}")
        stride = max(1, round(window * (1.0 - overlap)))
    stride = window if stride is None else int(stride)
    _check_positive(stride=stride)
    if num_frames <= window:
        return [Window(0, window, num_frames)]
    starts = list(range(0, num_frames - window + 1, stride))
    if starts[-1] + window < num_frames:
        starts.append(num_frames - window)
    return [Window(s, window, num_frames) for s in starts]


def random_crop_indices(
    num_frames: int, clip_len: int, *, step: int = 1, generator: np.random.Generator | None = None
) -> np.ndarray:
    """A random temporal crop of ``clip_len`` frames taken every ``step`` frames.

    Returns:
        ``[clip_len]`` int64 indices ``start + step·k`` (clamped to the last frame when the
        video is shorter than the crop, which then starts at 0).
    """
    _check_positive(num_frames=num_frames, clip_len=clip_len, step=step)
    rng = generator if generator is not None else np.random.default_rng()
    span = (clip_len - 1) * step + 1
    start = int(rng.integers(0, num_frames - span + 1)) if num_frames > span else 0
    return np.minimum(start + step * np.arange(clip_len), num_frames - 1).astype(np.int64)


def resample_indices(num_frames: int, src_fps: float, dst_fps: float) -> np.ndarray:
    """Frames nearest to the instants ``k / dst_fps`` (frame ``i`` shows time ``i / src_fps``).

    Args:
        num_frames: frames in the video.
        src_fps: the video's frame rate.
        dst_fps: the target rate (lower drops frames, higher repeats them).

    Returns:
        ``[floor(duration · dst_fps)]`` (at least 1) int64 indices into the video.
    """
    _check_positive(num_frames=num_frames)
    if not (src_fps > 0 and dst_fps > 0 and math.isfinite(src_fps) and math.isfinite(dst_fps)):
        raise ValueError(f"frame rates must be positive, got {src_fps} -> {dst_fps}")
    count = max(1, math.floor(num_frames / src_fps * dst_fps + 1e-9))
    times = np.arange(count) / dst_fps
    return np.minimum(np.floor(times * src_fps + 0.5 + 1e-9), num_frames - 1).astype(np.int64)


def frames_to_clip(
    frames: Tensor,
    mean: tuple[float, ...] | None = IMAGENET_MEAN,
    std: tuple[float, ...] | None = IMAGENET_STD,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Decoded frames to model input.

    Args:
        frames: ``uint8 [T, H, W, C]`` (or ``[B, T, H, W, C]``).
        mean: per-channel mean in [0, 1] units (``None``: only scale to [0, 1]).
        std: per-channel std.

    Returns:
        ``[C, T, H, W]`` (or ``[B, C, T, H, W]``) in ``dtype``.
    """
    if frames.dim() not in (4, 5):
        raise ValueError(
            f"expected frames [T, H, W, C] or [B, T, H, W, C], got {tuple(frames.shape)}"
        )
    x = frames.to(dtype) / 255.0
    x = x.movedim(-1, -4)  # [.., C, T, H, W]
    if mean is not None and std is not None:
        shape = (-1, 1, 1, 1)
        x = (x - torch.tensor(mean, dtype=dtype).view(shape)) / torch.tensor(std, dtype=dtype).view(
            shape
        )
    return x.contiguous()
