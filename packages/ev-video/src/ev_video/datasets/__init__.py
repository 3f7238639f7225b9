"""Temporal action datasets: THUMOS14 / ActivityNet-style annotations, synthetic videos, windows."""

from ev_video.datasets.annotations import (
    THUMOS14_CLASSES,
    THUMOS14_TEST_DROPPED,
    TemporalAnnotations,
    VideoInfo,
    load_activitynet_json,
    load_class_txt,
    load_thumos14,
    write_activitynet_json,
    write_class_txt,
)
from ev_video.datasets.synthetic import (
    SYNTHETIC_CLASSES,
    SyntheticVideoConfig,
    generate_synthetic_videos,
    render_video,
    write_mp4,
)
from ev_video.datasets.windows import VideoWindow, WindowDataset, collate_windows, find_video

__all__ = [
    "SYNTHETIC_CLASSES",
    "THUMOS14_CLASSES",
    "THUMOS14_TEST_DROPPED",
    "SyntheticVideoConfig",
    "TemporalAnnotations",
    "VideoInfo",
    "VideoWindow",
    "WindowDataset",
    "collate_windows",
    "find_video",
    "generate_synthetic_videos",
    "load_activitynet_json",
    "load_class_txt",
    "load_thumos14",
    "render_video",
    "write_activitynet_json",
    "write_class_txt",
    "write_mp4",
]
