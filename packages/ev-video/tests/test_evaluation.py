"""Detection mAP and AR@AN on hand-computed cases and against a loop-by-loop reference."""

from __future__ import annotations

import numpy as np
import pytest

from ev_video.errors import AnnotationError
from ev_video.evaluation import (
    evaluate_detections,
    evaluate_proposals,
    interpolated_average_precision,
    segment_iou,
)


def gt(v, label, s, e):
    return {"video_id": v, "label": label, "t_start": s, "t_end": e}


def pr(v, label, s, e, score):
    return {"video_id": v, "label": label, "t_start": s, "t_end": e, "score": score}


def test_segment_iou_hand() -> None:
    out = segment_iou(np.array([0.0, 10.0]), np.array([[0, 10], [5, 15], [10, 20], [2, 4]]))
    np.testing.assert_allclose(out, [1.0, 5 / 15, 0.0, 0.2])


def test_interpolated_ap_hand() -> None:
    # precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1 -> 0.5 * 1 + 0.5 * 2/3
    ap = interpolated_average_precision(np.array([1, 0.5, 2 / 3]), np.array([0.5, 0.5, 1.0]))
    assert ap == pytest.approx(0.5 + 1 / 3, abs=1e-12)


def test_duplicate_detection_and_class_without_predictions() -> None:
    truth = [gt("v1", "A", 0, 10), gt("v1", "A", 20, 30), gt("v1", "B", 40, 50)]
    preds = [
        pr("v1", "A", 0, 10, 0.9),  # TP
        pr("v1", "A", 0, 10, 0.8),  # duplicate of a locked GT -> FP
        pr("v1", "A", 20, 30, 0.7),  # TP
    ]
    res = evaluate_detections(truth, preds, tiou_thresholds=(0.5,))
    assert res.classes == ["A", "B"]
    assert res.ap.shape == (1, 2)
    assert res.ap[0, 0] == pytest.approx(0.5 + 0.5 * 2 / 3, abs=1e-12)
    assert res.ap[0, 1] == 0.0  # B has no predictions
    assert res.map[0] == pytest.approx((0.5 + 1 / 3) / 2, abs=1e-12)
    assert res.average_map == pytest.approx(res.map[0])


def test_video_without_ground_truth_is_a_false_positive() -> None:
    truth = [gt("v1", "A", 0, 10)]
    preds = [pr("v2", "A", 0, 10, 0.95), pr("v1", "A", 0, 10, 0.9)]
    res = evaluate_detections(truth, preds, tiou_thresholds=(0.5,))
    # FP then TP: precision 0, 1/2 at recall 0, 1 -> AP 0.5
    assert res.ap[0, 0] == pytest.approx(0.5)


def test_ties_later_prediction_ranks_first_as_activitynet() -> None:
    truth = [gt("v1", "A", 0, 10)]
    tp, fp = pr("v1", "A", 0, 10, 0.5), pr("v1", "A", 50, 60, 0.5)
    # ActivityNet's argsort()[::-1]: the later of two equal scores comes first.
    assert evaluate_detections(truth, [tp, fp], (0.5,)).ap[0, 0] == pytest.approx(0.5)
    assert evaluate_detections(truth, [fp, tp], (0.5,)).ap[0, 0] == pytest.approx(1.0)


def test_thresholds_change_matches() -> None:
    truth = [gt("v1", "A", 0, 10), gt("v1", "A", 100, 110)]
    preds = [pr("v1", "A", 0, 8, 0.9), pr("v1", "A", 100, 105, 0.8)]  # tIoU 0.8 and 0.5
    res = evaluate_detections(truth, preds)
    # 0.3-0.5: both TP -> AP 1; 0.6, 0.7: TP, FP -> AP 0.5 (recall 1/2 at precision 1)
    np.testing.assert_allclose(res.ap[:, 0], [1, 1, 1, 0.5, 0.5], atol=1e-12)
    assert res.map_at(0.5) == pytest.approx(1.0)
    assert res.average_map == pytest.approx(0.8)
    with pytest.raises(KeyError):
        res.map_at(0.55)


def test_each_ground_truth_matched_once_per_threshold_prefers_highest_tiou() -> None:
    truth = [gt("v1", "A", 0, 10), gt("v1", "A", 4, 14)]
    # first prediction overlaps GT2 best (tIoU 1) -> locks it; second gets GT1 (tIoU 0.67)
    preds = [pr("v1", "A", 4, 14, 0.9), pr("v1", "A", 2, 12, 0.8)]
    res = evaluate_detections(truth, preds, (0.5, 0.7))
    np.testing.assert_allclose(res.ap[:, 0], [1.0, 0.5], atol=1e-12)


def test_unknown_labels_ignored_and_bad_records_rejected() -> None:
    truth = [gt("v1", "A", 0, 10)]
    res = evaluate_detections(truth, [pr("v1", "Z", 0, 10, 1.0), pr("v1", "A", 0, 10, 0.1)])
    assert res.ignored_predictions == 1 and res.ap.shape == (5, 1)
    assert res.to_dict()["map"]["0.5"] == 1.0
    with pytest.raises(AnnotationError, match=r"predictions\[0\] lacks score"):
        evaluate_detections(truth, [gt("v1", "A", 0, 1)])
    with pytest.raises(AnnotationError, match="before it starts"):
        evaluate_detections([gt("v", "A", 5, 1)], [])
    with pytest.raises(AnnotationError, match="thresholds"):
        evaluate_detections(truth, [], tiou_thresholds=(0.0,))


def _reference_ap(truth, preds, thr):
    """Literal transcription of the steps of SYSTEMS §4.3 for one class (slow, obvious)."""
    order = sorted(range(len(preds)), key=lambda i: (preds[i]["score"], i), reverse=True)
    locked = set()
    flags = []
    for i in order:
        p = preds[i]
        cands = []
        for j, g in enumerate(truth):
            if g["video_id"] != p["video_id"]:
                continue
            inter = max(0.0, min(p["t_end"], g["t_end"]) - max(p["t_start"], g["t_start"]))
            union = (p["t_end"] - p["t_start"]) + (g["t_end"] - g["t_start"]) - inter
            cands.append((inter / union if union > 0 else 0.0, j))
        cands.sort(key=lambda c: (c[0], c[1]), reverse=True)
        hit = False
        for iou, j in cands:
            if iou < thr:
                break
            if j in locked:
                continue
            locked.add(j)
            hit = True
            break
        flags.append(hit)
    tp = np.cumsum(flags)
    fp = np.cumsum([not f for f in flags])
    rec = tp / len(truth)
    prec = tp / np.maximum(tp + fp, 1)
    # VOC: max precision at recall >= r, summed over recall steps
    ap, prev = 0.0, 0.0
    for k in range(len(rec)):
        if rec[k] != prev:
            ap += (rec[k] - prev) * max(prec[k:])
            prev = rec[k]
    return ap


@pytest.mark.parametrize("seed", range(6))
def test_matches_reference_on_random_sets(seed: int) -> None:
    rng = np.random.default_rng(seed)
    truth, preds = [], []
    for v in range(4):
        for _ in range(rng.integers(0, 5)):
            s = float(rng.uniform(0, 90))
            truth.append(gt(f"v{v}", "A", s, s + float(rng.uniform(1, 10))))
    if not truth:
        truth.append(gt("v0", "A", 0, 5))
    for _ in range(40):
        s = float(rng.uniform(0, 90))
        score = float(rng.integers(0, 8)) / 8  # many ties
        preds.append(pr(f"v{rng.integers(0, 5)}", "A", s, s + float(rng.uniform(1, 10)), score))
    res = evaluate_detections(truth, preds)
    for t, thr in enumerate(res.tiou_thresholds):
        assert res.ap[t, 0] == pytest.approx(_reference_ap(truth, preds, thr), abs=1e-12)


def test_proposals_ar_at_an_hand() -> None:
    truth = [gt("v1", "x", 0, 10), gt("v1", "x", 20, 30), gt("v2", "x", 0, 10)]
    props = [
        pr("v1", "x", 0, 10, 0.9),  # hits GT1
        pr("v1", "x", 50, 60, 0.8),  # miss
        pr("v1", "x", 20, 30, 0.1),  # hits GT2, ranked last
        pr("v2", "x", 0, 4, 0.5),  # tIoU 0.4 with v2's GT
    ]
    res = evaluate_proposals(truth, props, tiou_thresholds=(0.3, 0.5), max_avg_proposals=2)
    # AN=2 of 2 videos keeps 4*1=4 props -> v1 all 3, v2 its 1. At the last budget:
    # tIoU 0.3: 3/3 recalled; 0.5: 2/3 -> AR = 5/6
    assert res.ar_at_an == pytest.approx(5 / 6)
    assert res.proposals_per_video[-1] == pytest.approx(2.0)
    # at AN 1 (budget 50%): v1 keeps int(3*0.5)=1 -> GT1; v2 int(1*0.5)=0 -> nothing.
    assert res.ar_at(1.0) == pytest.approx(1 / 3)
    assert 0.0 < res.auc <= 1.0
    with pytest.raises(AnnotationError):
        evaluate_proposals([], props)
