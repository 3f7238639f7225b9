"""Video decoding (decord / PyAV) and clip sampling."""

from ev_video.io.reader import BACKENDS, VideoReader
from ev_video.io.sampling import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Window,
    frames_to_clip,
    random_crop_indices,
    resample_indices,
    sliding_windows,
    uniform_indices,
)

__all__ = [
    "BACKENDS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "VideoReader",
    "Window",
    "frames_to_clip",
    "random_crop_indices",
    "resample_indices",
    "sliding_windows",
    "uniform_indices",
]
