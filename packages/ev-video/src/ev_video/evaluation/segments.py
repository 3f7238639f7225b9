"""Segment records shared by the detection and proposal metrics.

A *record* is a mapping ``{"video_id", "label", "t_start", "t_end"}`` (seconds), plus
``"score"`` for predictions; proposals may omit ``"label"``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from ev_video.errors import AnnotationError

__all__ = ["check_records", "segment_iou"]


def segment_iou(segment: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """Temporal IoU of one segment against many.

    ``inter = max(0, min(e1, e2) - max(s1, s2))``, ``union = (e1 - s1) + (e2 - s2) - inter``
    (ActivityNet's definition). A zero union (two zero-length segments) gives 0 instead of
    ActivityNet's NaN.

    Args:
        segment: ``[2]`` ``(start, end)``.
        candidates: ``[N, 2]``.

    Returns:
        ``[N]`` float64 tIoU.
    """
    candidates = np.asarray(candidates, dtype=np.float64).reshape(-1, 2)
    s, e = float(segment[0]), float(segment[1])
    inter = np.clip(np.minimum(e, candidates[:, 1]) - np.maximum(s, candidates[:, 0]), 0.0, None)
    union = (candidates[:, 1] - candidates[:, 0]) + (e - s) - inter
    out = np.zeros_like(inter)
    np.divide(inter, union, out=out, where=union > 0)
    return out


def check_records(
    records: Iterable[Mapping[str, Any]], what: str, *, score: bool, label: bool = True
) -> list[dict[str, Any]]:
    """Validate detection records and return them as plain dicts with float times.

    Raises:
        AnnotationError: a record misses a key, has a non-finite time or score, or ends
            before it starts; the message names ``what`` and the record's position.
    """
    keys = (
        ["video_id", "t_start", "t_end"]
        + (["label"] if label else [])
        + (["score"] if score else [])
    )
    out: list[dict[str, Any]] = []
    for i, rec in enumerate(records):
        if not isinstance(rec, Mapping):
            raise AnnotationError(f"{what}[{i}] is a {type(rec).__name__}, not a mapping")
        missing = [k for k in keys if k not in rec]
        if missing:
            raise AnnotationError(f"{what}[{i}] lacks {', '.join(missing)}: {dict(rec)!r}")
        try:
            t0, t1 = float(rec["t_start"]), float(rec["t_end"])
            sc = float(rec["score"]) if score else None
        except (TypeError, ValueError) as exc:
            raise AnnotationError(f"{what}[{i}] has a non-numeric time or score: {exc}") from None
        if not (math.isfinite(t0) and math.isfinite(t1)) or (sc is not None and math.isnan(sc)):
            raise AnnotationError(
                f"{what}[{i}] has a non-finite time or a NaN score: {dict(rec)!r}"
            )
        if t1 < t0:
            raise AnnotationError(f"{what}[{i}] ends ({t1}) before it starts ({t0})")
        item = {"video_id": str(rec["video_id"]), "t_start": t0, "t_end": t1}
        if label:
            item["label"] = str(rec["label"])
        if score:
            item["score"] = sc
        out.append(item)
    return out
