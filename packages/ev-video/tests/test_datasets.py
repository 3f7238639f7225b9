"""THUMOS14 / ActivityNet annotation parsing (hand cases + hypothesis fuzzing), synthetic videos, windows."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ev_video.datasets import (
    THUMOS14_CLASSES,
    WindowDataset,
    collate_windows,
    load_activitynet_json,
    load_class_txt,
    load_thumos14,
)
from ev_video.errors import AnnotationError, VideoDecodeError
from ev_video.io import VideoReader


def _thumos_txt(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for c in THUMOS14_CLASSES:
        (folder / f"{c}_test.txt").write_text("")
    (folder / "BaseballPitch_test.txt").write_text(
        "video_test_0000004 0.2 1.1\nvideo_test_0000270 5.0 9.0\n\nvideo_test_0001292 1 2\n"
    )
    (folder / "Diving_test.txt").write_text(
        "video_test_0001496 30.0 45.5 \nvideo_test_0000004 3 4\n"
    )
    (folder / "Ambiguous_test.txt").write_text("video_test_0000004 7 8\n")
    return folder


def test_thumos_txt_lists_and_clipping(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = _thumos_txt(tmp_path / "ann")
    durations = {"video_test_0001496": 40.0, "video_test_0000004": 100.0}
    with caplog.at_level(logging.INFO, logger="ev_video.datasets.annotations"):
        a212 = load_thumos14(root, "test", "212", durations=durations)
    assert "test list 212" in caplog.text
    assert a212.classes == list(THUMOS14_CLASSES) and len(a212.classes) == 20
    vids = {s["video_id"] for s in a212.segments}
    assert vids == {"video_test_0000004", "video_test_0000270", "video_test_0001496"}
    assert all(s["label"] != "Ambiguous" for s in a212.segments)
    clipped = next(s for s in a212.segments if s["video_id"] == "video_test_0001496")
    assert clipped["t_end"] == 40.0  # clipped to the duration
    a211 = load_thumos14(root, "test", "211")
    assert "video_test_0000270" not in {s["video_id"] for s in a211.segments}
    assert any("211" in n for n in a211.notes)
    assert len(load_thumos14(root, "test", "213").segments) == 5
    with pytest.raises(AnnotationError, match="video_list"):
        load_thumos14(root, "test", "210")


def test_activitynet_json_roundtrip_and_thumos(tmp_path: Path) -> None:
    db = {
        "video_test_0000004": {"subset": "test", "duration": 10.0, "fps": 30.0, "annotations": [
            {"label": "Diving", "segment": [1.0, 12.0], "label_id": 7},
            {"label": "Ambiguous", "segment": [2.0, 3.0]}]},
        "video_test_0001292": {"subset": "test", "duration": 20.0, "fps": 30.0, "annotations": []},
        "video_validation_0000051": {"subset": "validation", "duration": 80.0, "fps": 30.0,
                                     "annotations": [{"label": "Billiards", "segment": [67.5, 75.9]}]},
    }  # fmt: skip
    path = tmp_path / "thumos.json"
    path.write_text(json.dumps({"database": db}))
    ann = load_thumos14(path, "test", "212")
    assert "video_test_0001292" not in ann.videos
    assert ann.segments == [
        {"video_id": "video_test_0000004", "label": "Diving", "t_start": 1.0, "t_end": 10.0}
    ]
    val = load_activitynet_json(path, "validation")
    assert val.classes == ["Billiards"] and val.videos["video_validation_0000051"].fps == 30.0


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("video_1 1.0\n", "line 1"),
        ("video_1 a b\n", "not a number"),
        ("ok 1 2\nvideo_1 5 3\n", "line 2.*before"),
        ("video_1 nan 3\n", "finite"),
    ],
)
def test_bad_txt_lines_name_file_and_line(tmp_path: Path, content: str, match: str) -> None:
    (tmp_path / "Jump_val.txt").write_text(content)
    with pytest.raises(AnnotationError, match=match) as info:
        load_class_txt(tmp_path, "val")
    assert "Jump_val.txt" in str(info.value)


def test_missing_class_file_and_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(AnnotationError, match=r"no <Class>_test\.txt"):
        load_class_txt(tmp_path, "test")
    with pytest.raises(AnnotationError, match=r"BaseballPitch_test\.txt"):
        load_thumos14(tmp_path, "test")


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
def test_fuzz_txt_parses_or_raises_our_error(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "Fuzz_test.txt"
    path.write_bytes(data)
    try:
        ann = load_class_txt(tmp_path, "test")
    except AnnotationError as exc:
        assert "Fuzz_test.txt" in str(exc)  # noqa: PT017  (parses or raises: both are fine)
        return
    for s in ann.segments:
        assert 0 <= s["t_start"] <= s["t_end"]


_json_values = st.recursive(
    st.none() | st.booleans() | st.floats(allow_nan=True) | st.integers() | st.text(max_size=8),
    lambda kids: (
        st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4)
    ),
    max_leaves=20,
)


@settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.one_of(
        _json_values,
        st.fixed_dictionaries(
            {
                "database": st.dictionaries(
                    st.text(max_size=6),
                    st.fixed_dictionaries(
                        {
                            "subset": st.sampled_from(["test", "validation", 3]),
                            "duration": st.one_of(
                                st.floats(allow_nan=True), st.none(), st.text(max_size=3)
                            ),
                            "annotations": st.lists(
                                st.fixed_dictionaries(
                                    {
                                        "label": st.sampled_from(["Diving", "Ambiguous", 5]),
                                        "segment": st.lists(
                                            st.floats(allow_nan=True) | st.text(max_size=2),
                                            max_size=3,
                                        ),
                                    }
                                ),
                                max_size=3,
                            ),
                        }
                    ),
                    max_size=3,
                )
            }
        ),
    )
)
def test_fuzz_json_parses_or_raises_our_error(tmp_path: Path, obj: object) -> None:
    path = tmp_path / "fuzz.json"
    path.write_text(json.dumps(obj))
    try:
        ann = load_activitynet_json(path)
    except AnnotationError as exc:
        assert "fuzz.json" in str(exc)  # noqa: PT017  (parses or raises: both are fine)
        return
    for s in ann.segments:
        assert 0 <= s["t_start"] <= s["t_end"] and s["label"] != "Ambiguous"


def test_invalid_json_bytes(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_bytes(b"\xff\xfe{")
    with pytest.raises(AnnotationError, match=r"bad\.json"):
        load_activitynet_json(path)


def test_synthetic_annotations_both_formats_agree(synthetic_root: Path) -> None:
    js = load_activitynet_json(synthetic_root / "annotations.json")
    txt = load_class_txt(synthetic_root / "annotations", "test")
    key = lambda s: (s["video_id"], s["t_start"], s["label"])  # noqa: E731
    assert sorted(js.segments, key=key) == sorted(txt.segments, key=key)
    assert len(js.videos) == 6 and all(
        v.duration == 12.0 and v.fps == 8.0 for v in js.videos.values()
    )
    # the labelled segments really contain the action colour (red square for Bounce etc.)
    seg = js.segments[0]
    with VideoReader(synthetic_root / "videos" / f"{seg['video_id']}.mp4") as vr:
        inside = vr[int((seg["t_start"] + seg["t_end"]) / 2 * 8)].float()
    sat = inside.max(-1).values - inside.min(-1).values
    assert (sat > 100).sum() >= 20  # a saturated coloured object is on screen


def test_window_dataset_targets_and_skip(synthetic_root: Path, tmp_path: Path) -> None:
    ann = load_activitynet_json(synthetic_root / "annotations.json")
    ds = WindowDataset(synthetic_root / "videos", ann, clip_len=32, overlap=0.5)
    assert len(ds) == 6 * 5  # 96 frames: starts 0, 16, 32, 48, 64
    item = ds[0]
    assert item["clip"].shape == (3, 32, 40, 40)
    for seg, lab in zip(item["segments"], item["labels"], strict=True):
        assert 0 <= seg[0] < seg[1] <= 32 and 0 <= lab < len(ann.classes)
    batch = collate_windows([ds[0], None, ds[1]])
    assert batch["clip"].shape == (2, 3, 32, 40, 40) and len(batch["segments"]) == 2
    # a broken file: raise by default, skip (None + warning) when asked
    broken = tmp_path / "videos"
    broken.mkdir()
    for p in (synthetic_root / "videos").glob("*.mp4"):
        (broken / p.name).write_bytes(p.read_bytes())
    victim = sorted(broken.glob("*.mp4"))[0]
    victim.write_bytes(b"")
    with pytest.raises(VideoDecodeError, match=victim.name):
        WindowDataset(broken, ann, clip_len=32)
    ds_skip = WindowDataset(broken, ann, clip_len=32, on_error="skip")
    assert ds_skip.skipped == [victim.stem] and len(ds_skip) == 25
    ok = WindowDataset(broken, ann, clip_len=32, on_error="skip")
    victim_2 = ok.windows[0].path
    victim_2.write_bytes(victim_2.read_bytes()[:500])  # truncated after indexing
    assert ok[0] is None
    assert collate_windows([ok[0]]) is None
    torch.manual_seed(0)


def test_window_jitter_random_crops(synthetic_root: Path) -> None:
    ann = load_activitynet_json(synthetic_root / "annotations.json")
    ds = WindowDataset(synthetic_root / "videos", ann, clip_len=32, overlap=0.5, jitter=8)
    torch.manual_seed(0)
    starts = {ds[2]["start"] for _ in range(30)}
    assert len(starts) > 3 and min(starts) >= 32 - 8 and max(starts) <= 32 + 8
    item = ds[0]
    assert item["clip"].shape == (3, 32, 40, 40) and 0 <= item["start"] <= 8
    for seg in item["segments"]:
        assert 0 <= seg[0] < seg[1] <= 32
