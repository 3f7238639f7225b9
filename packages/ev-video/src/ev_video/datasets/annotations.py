"""Temporal action annotations: THUMOS14 per-class text files and ActivityNet-style JSON.

Both formats load into :class:`TemporalAnnotations` (videos with duration/fps when known,
segments as ``{"video_id", "label", "t_start", "t_end"}`` records in seconds):

* text: one ``<Class>_<subset>.txt`` per class (``video start end`` per line, seconds); the
  ``Ambiguous_<subset>.txt`` file of THUMOS14 is not a class and is skipped;
* JSON: ``{"database": {video: {"subset", "duration", "fps", "annotations": [{"label",
  "segment": [start, end]}]}}}`` (ActivityNet / ActionFormer / OpenTAD).

THUMOS14's test-list pitfall (SYSTEMS.md §4.2): ``video_test_0001292`` has no event
(ActionFormer drops it: **212** videos) and ``video_test_0000270`` is mis-annotated (OpenTAD,
after G-TAD/VSGN, drops it too: **211**). :func:`load_thumos14` takes either list and logs
which one it used; segments past a video's end are clipped to its duration.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ev_video.errors import AnnotationError

__all__ = [
    "THUMOS14_CLASSES",
    "THUMOS14_TEST_DROPPED",
    "TemporalAnnotations",
    "VideoInfo",
    "load_activitynet_json",
    "load_class_txt",
    "load_thumos14",
    "write_activitynet_json",
    "write_class_txt",
]

log = logging.getLogger(__name__)

#: The 20 THUMOS14 detection classes (``Ambiguous`` is not one).
THUMOS14_CLASSES: tuple[str, ...] = (
    "BaseballPitch", "BasketballDunk", "Billiards", "CleanAndJerk", "CliffDiving",
    "CricketBowling", "CricketShot", "Diving", "FrisbeeCatch", "GolfSwing", "HammerThrow",
    "HighJump", "JavelinThrow", "LongJump", "PoleVault", "Shotput", "SoccerPenalty",
    "TennisSwing", "ThrowDiscus", "VolleyballSpiking",
)  # fmt: skip

#: Test videos each THUMOS14 list drops: "212" (ActionFormer) and "211" (OpenTAD, G-TAD, VSGN).
THUMOS14_TEST_DROPPED: dict[str, tuple[str, ...]] = {
    "213": (),
    "212": ("video_test_0001292",),
    "211": ("video_test_0001292", "video_test_0000270"),
}

_AMBIGUOUS = "Ambiguous"


@dataclass
class VideoInfo:
    """What is known of one video.

    Attributes:
        video_id: its name (file stem).
        subset: ``"validation"``, ``"test"``, ... (``""`` when unknown).
        duration: seconds (``None`` when unknown).
        fps: frames per second (``None`` when unknown).
    """

    video_id: str
    subset: str = ""
    duration: float | None = None
    fps: float | None = None


@dataclass
class TemporalAnnotations:
    """Videos and their labelled segments.

    Attributes:
        videos: ``video_id → VideoInfo`` (videos without segments included).
        segments: records ``{"video_id", "label", "t_start", "t_end"}`` (seconds).
        classes: the class labels, sorted (label id = position).
        notes: what loading changed (dropped videos, clipped segments), for logs and reports.
    """

    videos: dict[str, VideoInfo]
    segments: list[dict[str, Any]]
    classes: list[str]
    notes: list[str] = field(default_factory=list)

    def label_id(self, label: str) -> int:
        """Index of ``label`` in :attr:`classes`."""
        return self.classes.index(label)

    def segments_of(self, video_id: str) -> list[dict[str, Any]]:
        """Segments of one video, by start time."""
        return sorted(
            (s for s in self.segments if s["video_id"] == video_id), key=lambda s: s["t_start"]
        )

    def clip_to_durations(self) -> int:
        """Clip segments to their video's duration (dropping those starting after it).

        Returns:
            The number of segments changed or dropped (also recorded in :attr:`notes`).
        """
        kept, changed = [], 0
        for s in self.segments:
            info = self.videos.get(s["video_id"])
            dur = info.duration if info is not None else None
            if dur is None or s["t_end"] <= dur:
                kept.append(s)
                continue
            changed += 1
            if s["t_start"] >= dur:
                self.notes.append(
                    f"dropped {s['video_id']} {s['label']} {s['t_start']}-{s['t_end']}: starts after the end ({dur:.3f} s)"
                )
                continue
            kept.append({**s, "t_end": dur})
            self.notes.append(
                f"clipped {s['video_id']} {s['label']} end {s['t_end']} -> {dur:.3f} s"
            )
        self.segments = kept
        return changed

    def drop_videos(self, video_ids: Iterable[str], reason: str) -> None:
        """Remove videos and their segments (recorded in :attr:`notes`)."""
        drop = set(video_ids)
        present = sorted(
            drop & set(self.videos)
            | {s["video_id"] for s in self.segments if s["video_id"] in drop}
        )
        self.videos = {k: v for k, v in self.videos.items() if k not in drop}
        self.segments = [s for s in self.segments if s["video_id"] not in drop]
        if present:
            self.notes.append(f"dropped {', '.join(present)} ({reason})")


def _parse_float(text: str, path: Path, line_no: int) -> float:
    try:
        value = float(text)
    except ValueError:
        raise AnnotationError(f"line {line_no}: {text!r} is not a number", path) from None
    if not math.isfinite(value) or value < 0:
        raise AnnotationError(f"line {line_no}: time {text!r} must be finite and >= 0", path)
    return value


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise AnnotationError(f"not UTF-8 text: {exc}", path) from None


def _parse_class_file(path: Path, label: str) -> list[dict[str, Any]]:
    records = []
    for line_no, line in enumerate(_read_text(path).splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 3:
            raise AnnotationError(
                f"line {line_no}: expected 'video start end', got {line.strip()!r}", path
            )
        t0, t1 = _parse_float(parts[1], path, line_no), _parse_float(parts[2], path, line_no)
        if t1 < t0:
            raise AnnotationError(
                f"line {line_no}: segment ends ({t1}) before it starts ({t0})", path
            )
        records.append({"video_id": parts[0], "label": label, "t_start": t0, "t_end": t1})
    return records


def load_class_txt(
    folder: str | os.PathLike[str], subset: str, classes: Iterable[str] | None = None
) -> TemporalAnnotations:
    """Read per-class ``<Class>_<subset>.txt`` files.

    Args:
        folder: the annotation folder.
        subset: file suffix (``"test"``, ``"val"``).
        classes: the classes to read (each file must exist); default: every
            ``*_<subset>.txt`` in the folder except ``Ambiguous``.

    Raises:
        AnnotationError: a missing class file, a malformed line (names file and line), or no
            class file at all.
    """
    root = Path(folder)
    if not root.is_dir():
        raise AnnotationError("annotation folder does not exist", root)
    if classes is None:
        pattern = re.compile(rf"^(.+)_{re.escape(subset)}\.txt$")
        found = sorted(m.group(1) for p in root.iterdir() if (m := pattern.match(p.name)))
        classes = [c for c in found if c != _AMBIGUOUS]
    classes = sorted(set(classes))
    if not classes:
        raise AnnotationError(f"no <Class>_{subset}.txt annotation file found", root)
    segments: list[dict[str, Any]] = []
    for label in classes:
        path = root / f"{label}_{subset}.txt"
        if not path.is_file():
            raise AnnotationError(f"missing annotation file for class {label!r}", path)
        segments.extend(_parse_class_file(path, label))
    videos = {s["video_id"]: VideoInfo(s["video_id"], subset) for s in segments}
    return TemporalAnnotations(videos=videos, segments=segments, classes=list(classes))


def load_activitynet_json(
    path: str | os.PathLike[str], subset: str | None = None
) -> TemporalAnnotations:
    """Read an ActivityNet-style JSON file.

    Args:
        path: the JSON file (``{"database": {...}}``, or the database mapping itself).
        subset: keep only videos of this subset (``None``: all).

    Raises:
        AnnotationError: invalid JSON or a field of the wrong type (names the file and video).
    """
    path = Path(path)
    try:
        data = json.loads(_read_text(path))
    except FileNotFoundError:
        raise AnnotationError("annotation file does not exist", path) from None
    except json.JSONDecodeError as exc:
        raise AnnotationError(f"invalid JSON: {exc}", path) from None
    db = data.get("database", data) if isinstance(data, Mapping) else None
    if not isinstance(db, Mapping):
        raise AnnotationError("expected a JSON object with a 'database' mapping", path)
    videos: dict[str, VideoInfo] = {}
    segments: list[dict[str, Any]] = []
    for vid, entry in db.items():
        if not isinstance(entry, Mapping):
            raise AnnotationError(f"video {vid!r}: entry is not an object", path)
        vsub = entry.get("subset", "")
        if subset is not None and vsub != subset:
            continue
        try:
            dur = entry.get("duration")
            fps = entry.get("fps")
            dur = None if dur is None else float(dur)
            fps = None if fps is None else float(fps)
        except (TypeError, ValueError):
            raise AnnotationError(f"video {vid!r}: duration/fps must be numbers", path) from None
        if (dur is not None and not (math.isfinite(dur) and dur >= 0)) or (
            fps is not None and not (math.isfinite(fps) and fps > 0)
        ):
            raise AnnotationError(f"video {vid!r}: bad duration {dur} or fps {fps}", path)
        videos[str(vid)] = VideoInfo(str(vid), str(vsub), dur, fps)
        anns = entry.get("annotations", [])
        if not isinstance(anns, list):
            raise AnnotationError(f"video {vid!r}: 'annotations' is not a list", path)
        for k, ann in enumerate(anns):
            seg = ann.get("segment") if isinstance(ann, Mapping) else None
            label = ann.get("label") if isinstance(ann, Mapping) else None
            if not isinstance(label, str) or not isinstance(seg, list) or len(seg) != 2:
                raise AnnotationError(
                    f"video {vid!r} annotation {k}: needs 'label' (str) and 'segment' [start, end]",
                    path,
                )
            try:
                t0, t1 = float(seg[0]), float(seg[1])
            except (TypeError, ValueError):
                raise AnnotationError(
                    f"video {vid!r} annotation {k}: non-numeric segment", path
                ) from None
            if not (math.isfinite(t0) and math.isfinite(t1)) or t1 < t0 or t0 < 0:
                raise AnnotationError(f"video {vid!r} annotation {k}: bad segment {seg}", path)
            if label == _AMBIGUOUS:
                continue
            segments.append({"video_id": str(vid), "label": label, "t_start": t0, "t_end": t1})
    classes = sorted({s["label"] for s in segments})
    return TemporalAnnotations(videos=videos, segments=segments, classes=classes)


def load_thumos14(
    source: str | os.PathLike[str],
    subset: str = "test",
    video_list: str = "212",
    durations: Mapping[str, float] | None = None,
) -> TemporalAnnotations:
    """THUMOS14 annotations with the 20 classes, a chosen test list and clipped segments.

    Args:
        source: a folder of ``<Class>_<subset>.txt`` files or an ActivityNet-style JSON file.
        subset: ``"test"`` or ``"val"``/``"validation"`` (JSON: the ``subset`` field value;
            text: the file suffix).
        video_list: for the test subset, ``"212"`` (drop video_test_0001292, ActionFormer),
            ``"211"`` (also drop video_test_0000270, OpenTAD) or ``"213"`` (keep all). Logged.
        durations: ``video_id → seconds`` to clip segments with (JSON durations are used
            otherwise; text annotations have none).

    Raises:
        AnnotationError: unreadable annotations, or a class outside the THUMOS14 20.
    """
    if video_list not in THUMOS14_TEST_DROPPED:
        raise AnnotationError(
            f"video_list must be one of {sorted(THUMOS14_TEST_DROPPED)}, got {video_list!r}"
        )
    src = Path(source)
    if src.is_dir():
        suffix = {"validation": "val"}.get(subset, subset)
        ann = load_class_txt(src, suffix, THUMOS14_CLASSES)
    else:
        ann = load_activitynet_json(src, subset=subset)
    unknown = sorted(set(ann.classes) - set(THUMOS14_CLASSES))
    if unknown:
        raise AnnotationError(f"classes outside THUMOS14's 20: {', '.join(unknown)}", src)
    ann.classes = list(THUMOS14_CLASSES)
    if durations:
        for vid, dur in durations.items():
            info = ann.videos.setdefault(vid, VideoInfo(vid, subset))
            info.duration = float(dur)
    if subset == "test":
        dropped = THUMOS14_TEST_DROPPED[video_list]
        ann.drop_videos(dropped, f"THUMOS14 {video_list}-video test list")
        n_videos = len(ann.videos)
        log.info(
            "THUMOS14 test list %s: %d videos (dropped: %s)",
            video_list,
            n_videos,
            ", ".join(dropped) or "none",
        )
        ann.notes.append(
            f"THUMOS14 test list: {video_list} ({n_videos} videos with annotations here)"
        )
    changed = ann.clip_to_durations()
    if changed:
        log.info("THUMOS14: %d segments clipped to their video's duration", changed)
    return ann


def write_class_txt(
    ann: TemporalAnnotations, folder: str | os.PathLike[str], subset: str
) -> list[Path]:
    """Write one ``<Class>_<subset>.txt`` per class (empty files for classes without segments)."""
    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for label in ann.classes:
        lines = [
            f"{s['video_id']} {s['t_start']:.10g} {s['t_end']:.10g}\n"
            for s in sorted(ann.segments, key=lambda s: (s["video_id"], s["t_start"]))
            if s["label"] == label
        ]
        path = root / f"{label}_{subset}.txt"
        path.write_text("".join(lines), encoding="utf-8")
        paths.append(path)
    return paths


def write_activitynet_json(ann: TemporalAnnotations, path: str | os.PathLike[str]) -> Path:
    """Write the ActivityNet-style JSON (``label_id`` from the sorted class list)."""
    from ev_core.io import write_json

    db: dict[str, Any] = {}
    for vid, info in ann.videos.items():
        db[vid] = {
            "subset": info.subset,
            "duration": info.duration,
            "fps": info.fps,
            "annotations": [
                {
                    "label": s["label"],
                    "segment": [s["t_start"], s["t_end"]],
                    "label_id": ann.label_id(s["label"]),
                }
                for s in ann.segments_of(vid)
            ],
        }
    return write_json(path, {"database": db})
