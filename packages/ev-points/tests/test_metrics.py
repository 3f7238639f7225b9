"""SegmentationMeter against explicit per-class counting."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ev_core.errors import EvError
from ev_points.metrics import SegmentationMeter


def test_meter_matches_explicit_counts() -> None:
    rng = np.random.default_rng(0)
    meter = SegmentationMeter(4, ignore_index=-1, class_names=["a", "b", "c", "d"])
    preds, targets = [], []
    for _ in range(3):  # accumulated over a split, not averaged per batch
        t = rng.integers(-1, 4, 500)
        p = np.where(rng.random(500) < 0.6, t, rng.integers(0, 4, 500)).clip(0)
        meter.update(torch.from_numpy(p), torch.from_numpy(t))
        preds.append(p)
        targets.append(t)
    p, t = np.concatenate(preds), np.concatenate(targets)
    keep = t != -1
    p, t = p[keep], t[keep]
    out = meter.compute()
    ious = []
    for c in range(4):
        tp = np.sum((p == c) & (t == c))
        fp = np.sum((p == c) & (t != c))
        fn = np.sum((p != c) & (t == c))
        ious.append(tp / (tp + fp + fn))
        assert out["iou"]["abcd"[c]] == pytest.approx(tp / (tp + fp + fn), abs=1e-12)
        assert out["acc"]["abcd"[c]] == pytest.approx(tp / np.sum(t == c), abs=1e-12)
    assert out["miou"] == pytest.approx(np.mean(ious), abs=1e-12)
    assert out["oa"] == pytest.approx(np.mean(p == t), abs=1e-12)


def test_absent_class_is_excluded_with_warning() -> None:
    meter = SegmentationMeter(3)
    meter.update(np.array([0, 1, 1]), np.array([0, 1, 0]))
    with pytest.warns(UserWarning, match="absent"):
        out = meter.compute()
    assert np.isnan(out["iou"]["2"])
    assert out["miou"] == pytest.approx((0.5 + 0.5) / 2)


def test_merge_and_errors() -> None:
    a, b = SegmentationMeter(2), SegmentationMeter(2)
    a.update(np.array([0]), np.array([0]))
    b.update(np.array([1]), np.array([1]))
    a.merge(b)
    assert a.compute()["miou"] == 1.0
    with pytest.raises(EvError, match="labels"):
        a.update(np.array([5]), np.array([0]))
    with pytest.raises(EvError, match="shape"):
        a.update(np.array([0, 1]), np.array([0]))
