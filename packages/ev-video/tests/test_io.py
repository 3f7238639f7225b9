"""VideoReader: decord and PyAV give identical frames; errors name the file; samplers."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from ev_video.errors import VideoDecodeError
from ev_video.io import (
    VideoReader,
    frames_to_clip,
    random_crop_indices,
    resample_indices,
    sliding_windows,
    uniform_indices,
)

RANDOM_ORDER = [131, 0, 5, 50, 51, 120, 3, 3, -1, 77]


def _both(path: Path, **kw: int) -> tuple[VideoReader, VideoReader]:
    return VideoReader(path, "decord", **kw), VideoReader(path, "pyav", **kw)


def test_bigbuckbunny_decord_equals_pyav(bigbuckbunny: Path) -> None:
    d, p = _both(bigbuckbunny)
    assert len(d) == len(p) == 132 and d.fps == p.fps == 25.0
    assert d.duration == pytest.approx(132 / 25)
    a, b = d.get_batch(RANDOM_ORDER), p.get_batch(RANDOM_ORDER)
    assert a.dtype == torch.uint8 and a.shape == (10, 720, 1280, 3)
    assert torch.equal(a, b)
    assert torch.equal(a[6], a[7])  # duplicates copied
    assert torch.equal(d[-1], a[0])


def test_bigbuckbunny_resize_in_decoder_equal(bigbuckbunny: Path) -> None:
    d, p = _both(bigbuckbunny, width=160, height=90)
    a = d.get_batch(range(0, 132, 3))
    assert a.shape == (44, 90, 160, 3)
    assert torch.equal(a, p.get_batch(range(0, 132, 3)))
    assert d.frame_size == (90, 160)


def test_generated_clip_random_access_equal(synthetic_root: Path) -> None:
    path = sorted((synthetic_root / "videos").glob("*.mp4"))[0]
    d, p = _both(path)
    assert len(d) == len(p) == 96 and d.fps == pytest.approx(8.0)
    assert d.keyframe_indices() == p.keyframe_indices() == list(range(0, 96, 16))
    order = np.random.default_rng(0).permutation(96).tolist()
    seq = d.get_batch(range(96))
    assert torch.equal(d.get_batch(order), seq[order])  # accurate seeking, any order
    assert torch.equal(p.get_batch(order), seq[order])


def test_decord_size_bug_falls_back_to_identical_pyav(synthetic_root: Path) -> None:
    path = sorted((synthetic_root / "videos").glob("*.mp4"))[0]
    d, p = _both(path, width=32, height=32)  # 32x32 trips decord2's copy bug
    a = d.get_batch(range(0, 96, 5))
    assert d.backend_used == "pyav" and a.shape[1:] == (32, 32, 3)
    assert torch.equal(a, p.get_batch(range(0, 96, 5)))


@pytest.mark.parametrize("backend", ["decord", "pyav"])
def test_bad_files_raise_video_decode_error_naming_the_file(
    tmp_path: Path, synthetic_root: Path, backend: str
) -> None:
    missing = tmp_path / "missing.mp4"
    with pytest.raises(VideoDecodeError, match=r"missing\.mp4"):
        VideoReader(missing, backend)
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(VideoDecodeError, match=r"empty\.mp4.*empty"):
        VideoReader(empty, backend)
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(VideoDecodeError, match=r"garbage\.mp4"):
        VideoReader(garbage, backend)
    src = sorted((synthetic_root / "videos").glob("*.mp4"))[0]
    data = src.read_bytes()
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(data[: len(data) // 2])  # the moov atom (index) is at the end: gone
    with (
        pytest.raises(VideoDecodeError, match=r"truncated\.mp4"),
        VideoReader(truncated, backend) as vr,
    ):
        vr.get_batch(range(len(vr)))


def test_corrupt_middle_raises_or_decodes(tmp_path: Path, synthetic_root: Path) -> None:
    """Zeroed packet data: either frames still decode (FFmpeg conceals) or the error names the file."""
    src = sorted((synthetic_root / "videos").glob("*.mp4"))[1]
    data = bytearray(src.read_bytes())
    data[len(data) // 3 : len(data) // 3 + 2000] = bytes(2000)
    bad = tmp_path / "corrupt.mp4"
    bad.write_bytes(bytes(data))
    for backend in ("decord", "pyav"):
        try:
            with VideoReader(bad, backend) as vr:
                out = vr.get_batch(range(len(vr)))
            assert out.shape[0] == len(vr)
        except VideoDecodeError as exc:
            assert "corrupt.mp4" in str(exc)  # noqa: PT017  (decoding may also succeed)


def test_reader_argument_errors(synthetic_root: Path) -> None:
    path = sorted((synthetic_root / "videos").glob("*.mp4"))[0]
    with pytest.raises(ValueError, match="backend"):
        VideoReader(path, "opencv")
    with pytest.raises(ValueError, match="width and height"):
        VideoReader(path, width=32)
    vr = VideoReader(path, "pyav")
    with pytest.raises(IndexError, match="out of range"):
        vr.get_batch([96])
    vr.close()
    with pytest.raises(ValueError, match="closed"):
        len(vr)
    copy = synthetic_root.parent / "not_a_file_dir"
    copy.mkdir(exist_ok=True)
    with pytest.raises(VideoDecodeError, match="not a file"):
        VideoReader(copy)
    shutil.rmtree(copy)


def test_samplers() -> None:
    np.testing.assert_array_equal(uniform_indices(10, 4), [0, 3, 6, 9])
    w = sliding_windows(100, 32, overlap=0.5)
    assert [x.start for x in w] == [0, 16, 32, 48, 64, 68]
    assert all(len(x.indices) == 32 for x in w) and w[-1].indices[-1] == 99
    short = sliding_windows(10, 32)
    assert len(short) == 1 and short[0].valid == 10 and short[0].indices[-1] == 9
    assert [x.start for x in sliding_windows(64, 32, stride=32)] == [0, 32]
    with pytest.raises(ValueError):
        sliding_windows(64, 32, stride=8, overlap=0.5)
    rng = np.random.default_rng(0)
    crops = {int(random_crop_indices(100, 10, step=2, generator=rng)[0]) for _ in range(50)}
    assert len(crops) > 10 and max(crops) <= 100 - 19
    np.testing.assert_array_equal(
        random_crop_indices(5, 8, generator=rng), [0, 1, 2, 3, 4, 4, 4, 4]
    )
    np.testing.assert_array_equal(resample_indices(10, 10.0, 5.0), [0, 2, 4, 6, 8])
    np.testing.assert_array_equal(resample_indices(4, 2.0, 4.0), [0, 1, 1, 2, 2, 3, 3, 3][:8])
    assert len(resample_indices(300, 29.97, 8.0)) == int(300 / 29.97 * 8)


def test_frames_to_clip() -> None:
    frames = torch.randint(0, 256, (5, 4, 6, 3), dtype=torch.uint8)
    clip = frames_to_clip(frames, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    assert clip.shape == (3, 5, 4, 6) and clip.dtype == torch.float32
    ref = (frames.double().permute(3, 0, 1, 2) / 255 - 0.5) / 0.5
    torch.testing.assert_close(clip.double(), ref, rtol=0, atol=1e-6)
    assert frames_to_clip(frames[None], None, None).shape == (1, 3, 5, 4, 6)
