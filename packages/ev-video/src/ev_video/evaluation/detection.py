"""Temporal action detection mAP with ActivityNet's ``eval_detection`` semantics.

For every class (sorted label order, classes taken from the ground truth):

1. predictions of that class are sorted by descending score -- ``argsort(kind="stable")``
   reversed, i.e. ActivityNet's ``argsort()[::-1]``: among equal scores the prediction given
   *later* comes first (NumPy's default sort is stable on the small arrays ActivityNet's tests
   use; the stable sort makes this hold at every size);
2. each prediction is compared (tIoU) with the ground truth of its class in its video; a video
   without such ground truth makes it a false positive at every threshold;
3. per tIoU threshold, the ground truths are walked by descending tIoU (ties: later first):
   below the threshold → false positive, stop; already matched at this threshold → next;
   otherwise → true positive and the ground truth is locked;
4. cumulative TP/FP give recall ``TP / n_gt`` and precision ``TP / (TP + FP)``; AP is the
   VOC-2011 interpolated area (precision padded with 0, recall with 0 and 1, precision made
   non-increasing from the right, summed over recall changes);
5. a class without predictions has AP 0; mAP is the mean over classes, average mAP the mean
   over thresholds.

This is the official algorithm without its Python-2 ``print``, pandas and ``np.float``
breakage. Predictions whose label has no ground truth anywhere are not part of any class (as
ActivityNet, which only evaluates the ground truth's classes); they are counted in
:attr:`DetectionResult.ignored_predictions`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ev_video.errors import AnnotationError
from ev_video.evaluation.segments import check_records, segment_iou

__all__ = [
    "THUMOS_TIOU_THRESHOLDS",
    "DetectionResult",
    "average_precision_detection",
    "evaluate_detections",
    "interpolated_average_precision",
]

#: tIoU thresholds of the THUMOS14 protocol.
THUMOS_TIOU_THRESHOLDS: tuple[float, ...] = (0.3, 0.4, 0.5, 0.6, 0.7)


def interpolated_average_precision(precision: np.ndarray, recall: np.ndarray) -> float:
    """VOC-2011 interpolated AP of one precision/recall curve (ActivityNet's ``interpolated_prec_rec``).

    Args:
        precision: ``[N]`` precision after each ranked prediction.
        recall: ``[N]`` recall after each ranked prediction (non-decreasing).

    Returns:
        ``sum((r[i] - r[i-1]) * p_interp[i])`` over the points where recall changes.
    """
    mprec = np.concatenate([[0.0], np.asarray(precision, np.float64), [0.0]])
    mrec = np.concatenate([[0.0], np.asarray(recall, np.float64), [1.0]])
    mprec = np.maximum.accumulate(mprec[::-1])[::-1]
    idx = np.nonzero(mrec[1:] != mrec[:-1])[0] + 1
    return float(np.sum((mrec[idx] - mrec[idx - 1]) * mprec[idx]))


def _descending(values: np.ndarray) -> np.ndarray:
    """ActivityNet's ``argsort()[::-1]`` made deterministic: ties keep the *later* item first."""
    return np.argsort(values, kind="stable")[::-1]


def average_precision_detection(
    ground_truth: Sequence[Mapping[str, Any]],
    predictions: Sequence[Mapping[str, Any]],
    tiou_thresholds: Sequence[float],
) -> np.ndarray:
    """AP of one class at every threshold (ActivityNet's ``compute_average_precision_detection``).

    Args:
        ground_truth: records of one class (``video_id``, ``t_start``, ``t_end``).
        predictions: records of the same class with ``score``.
        tiou_thresholds: ``[K]`` thresholds.

    Returns:
        ``[K]`` float64 AP (zeros when there are no predictions or no ground truth).
    """
    thresholds = np.asarray(tiou_thresholds, dtype=np.float64)
    ap = np.zeros(len(thresholds))
    if not predictions or not ground_truth:
        return ap
    gt_by_video: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    grouped: dict[str, list[int]] = defaultdict(list)
    for i, g in enumerate(ground_truth):
        grouped[g["video_id"]].append(i)
    for vid, idx in grouped.items():
        segs = np.array([[ground_truth[i]["t_start"], ground_truth[i]["t_end"]] for i in idx])
        gt_by_video[vid] = (np.asarray(idx), segs)
    scores = np.array([p["score"] for p in predictions], dtype=np.float64)
    order = _descending(scores)
    n_pred = len(order)
    lock = np.full((len(thresholds), len(ground_truth)), -1, dtype=np.int64)
    tp = np.zeros((len(thresholds), n_pred))
    fp = np.zeros((len(thresholds), n_pred))
    for rank, pi in enumerate(order):
        pred = predictions[pi]
        entry = gt_by_video.get(pred["video_id"])
        if entry is None:
            fp[:, rank] = 1
            continue
        gt_index, segs = entry
        tiou = segment_iou(np.array([pred["t_start"], pred["t_end"]]), segs)
        by_tiou = _descending(tiou)
        for t, thr in enumerate(thresholds):
            for j in by_tiou:
                if tiou[j] < thr:
                    break
                if lock[t, gt_index[j]] >= 0:
                    continue
                tp[t, rank] = 1
                lock[t, gt_index[j]] = rank
                break
            if tp[t, rank] == 0:
                fp[t, rank] = 1
    tp_cum = np.cumsum(tp, axis=1)
    fp_cum = np.cumsum(fp, axis=1)
    recall = tp_cum / len(ground_truth)
    precision = tp_cum / (tp_cum + fp_cum)
    for t in range(len(thresholds)):
        ap[t] = interpolated_average_precision(precision[t], recall[t])
    return ap


@dataclass
class DetectionResult:
    """Detection mAP of a prediction set.

    Attributes:
        ap: ``[len(tiou_thresholds), n_classes]`` AP, classes in :attr:`classes` order.
        classes: class labels, sorted.
        tiou_thresholds: the thresholds (rows of :attr:`ap`).
        num_ground_truth: ground-truth segments per class.
        num_predictions: predictions per class.
        ignored_predictions: predictions whose label has no ground truth.
    """

    ap: np.ndarray
    classes: list[str]
    tiou_thresholds: tuple[float, ...]
    num_ground_truth: dict[str, int] = field(default_factory=dict)
    num_predictions: dict[str, int] = field(default_factory=dict)
    ignored_predictions: int = 0

    @property
    def map(self) -> np.ndarray:
        """``[len(tiou_thresholds)]`` mean AP over classes."""
        return self.ap.mean(axis=1) if self.ap.shape[1] else np.zeros(self.ap.shape[0])

    @property
    def average_map(self) -> float:
        """Mean of :attr:`map` over the thresholds."""
        return float(self.map.mean()) if self.map.size else 0.0

    def map_at(self, tiou: float) -> float:
        """mAP at one of :attr:`tiou_thresholds`.

        Raises:
            KeyError: ``tiou`` is not one of the thresholds.
        """
        for i, t in enumerate(self.tiou_thresholds):
            if abs(t - tiou) < 1e-9:
                return float(self.map[i])
        raise KeyError(f"tIoU {tiou} was not evaluated; thresholds: {self.tiou_thresholds}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary (mAP per threshold, average mAP, AP per class)."""
        return {
            "tiou_thresholds": list(self.tiou_thresholds),
            "map": {
                f"{t:g}": float(m) for t, m in zip(self.tiou_thresholds, self.map, strict=True)
            },
            "average_map": self.average_map,
            "ap_per_class": {
                c: [float(v) for v in self.ap[:, i]] for i, c in enumerate(self.classes)
            },
            "num_ground_truth": dict(self.num_ground_truth),
            "num_predictions": dict(self.num_predictions),
            "ignored_predictions": self.ignored_predictions,
        }

    def summary(self) -> str:
        """One line: mAP per threshold and the average."""
        parts = [
            f"mAP@{t:g}={m * 100:.2f}" for t, m in zip(self.tiou_thresholds, self.map, strict=True)
        ]
        return "  ".join(parts) + f"  average={self.average_map * 100:.2f}"


def evaluate_detections(
    ground_truth: Iterable[Mapping[str, Any]],
    predictions: Iterable[Mapping[str, Any]],
    tiou_thresholds: Sequence[float] = THUMOS_TIOU_THRESHOLDS,
) -> DetectionResult:
    """Per-class AP at each tIoU threshold, mAP and average mAP (ActivityNet semantics).

    Args:
        ground_truth: records ``{"video_id", "label", "t_start", "t_end"}`` (seconds).
        predictions: the same plus ``"score"``.
        tiou_thresholds: thresholds; THUMOS14's 0.3:0.1:0.7 by default (ActivityNet uses
            ``np.linspace(0.5, 0.95, 10)``).

    Returns:
        A :class:`DetectionResult` (``.ap [n_tiou, n_classes]``, ``.map``, ``.average_map``).

    Raises:
        AnnotationError: a malformed record, or a threshold outside (0, 1].
    """
    thresholds = tuple(float(t) for t in tiou_thresholds)
    if not thresholds or any(not 0.0 < t <= 1.0 for t in thresholds):
        raise AnnotationError(f"tIoU thresholds must be in (0, 1], got {thresholds}")
    gt = check_records(ground_truth, "ground_truth", score=False)
    preds = check_records(predictions, "predictions", score=True)
    classes = sorted({g["label"] for g in gt})
    gt_by_class: dict[str, list[dict[str, Any]]] = defaultdict(list)
    pred_by_class: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for g in gt:
        gt_by_class[g["label"]].append(g)
    known = set(classes)
    ignored = 0
    for p in preds:
        if p["label"] in known:
            pred_by_class[p["label"]].append(p)
        else:
            ignored += 1
    ap = np.zeros((len(thresholds), len(classes)))
    for c, label in enumerate(classes):
        ap[:, c] = average_precision_detection(gt_by_class[label], pred_by_class[label], thresholds)
    return DetectionResult(
        ap=ap,
        classes=classes,
        tiou_thresholds=thresholds,
        num_ground_truth={c: len(gt_by_class[c]) for c in classes},
        num_predictions={c: len(pred_by_class[c]) for c in classes},
        ignored_predictions=ignored,
    )
