"""Semantic-segmentation metrics accumulated over a whole split (confusion matrix)."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch

from ev_core.errors import EvError

__all__ = ["SegmentationMeter"]


class SegmentationMeter:
    """Confusion matrix over a split; IoU_c = TP / (TP + FP + FN) on the accumulated counts.

    Points whose target is ``ignore_index`` are skipped. A class that never appears in the
    targets nor the predictions has no IoU (NaN, excluded from mIoU/mAcc, with a warning).

    Args:
        num_classes: C.
        ignore_index: target label that is not scored.
        class_names: optional names for :meth:`compute`'s per-class dictionary.
    """

    def __init__(
        self, num_classes: int, ignore_index: int = -1, class_names: Sequence[str] | None = None
    ) -> None:
        if num_classes < 1:
            raise EvError(f"num_classes must be >= 1, got {num_classes}")
        if class_names is not None and len(class_names) != num_classes:
            raise EvError(f"{len(class_names)} class names for {num_classes} classes")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.class_names = (
            list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
        )
        self.confusion = np.zeros(
            (num_classes, num_classes), dtype=np.int64
        )  # [target, prediction]

    def reset(self) -> None:
        """Zero the confusion matrix."""
        self.confusion[:] = 0

    def update(self, pred: torch.Tensor | np.ndarray, target: torch.Tensor | np.ndarray) -> None:
        """Add predictions and targets of any matching shape (class ids)."""
        p = pred.detach().cpu().numpy() if isinstance(pred, torch.Tensor) else np.asarray(pred)
        t = (
            target.detach().cpu().numpy()
            if isinstance(target, torch.Tensor)
            else np.asarray(target)
        )
        if p.shape != t.shape:
            raise EvError(f"prediction shape {p.shape} != target shape {t.shape}")
        p, t = p.reshape(-1).astype(np.int64), t.reshape(-1).astype(np.int64)
        keep = t != self.ignore_index
        p, t = p[keep], t[keep]
        c = self.num_classes
        bad = (t < 0) | (t >= c) | (p < 0) | (p >= c)
        if bad.any():
            raise EvError(f"labels must lie in [0, {c}) or equal ignore_index={self.ignore_index}")
        self.confusion += np.bincount(t * c + p, minlength=c * c).reshape(c, c)

    def merge(self, other: SegmentationMeter) -> None:
        """Add another meter's counts (e.g. the folds of a 6-fold evaluation, or DDP ranks)."""
        if other.num_classes != self.num_classes:
            raise EvError("cannot merge meters with different num_classes")
        self.confusion += other.confusion

    def compute(self) -> dict[str, float | dict[str, float]]:
        """``{"miou", "oa", "macc", "iou": {class: IoU}, "acc": {class: acc}}`` (fractions)."""
        cm = self.confusion.astype(np.float64)
        tp = np.diag(cm)
        gt, pr = cm.sum(1), cm.sum(0)
        union = gt + pr - tp
        with np.errstate(invalid="ignore", divide="ignore"):
            iou = np.where(union > 0, tp / union, np.nan)
            acc = np.where(gt > 0, tp / gt, np.nan)
        absent = [self.class_names[i] for i in np.nonzero(union == 0)[0]]
        if absent and cm.sum() > 0:
            warnings.warn(
                f"classes absent from targets and predictions (excluded from mIoU): {absent}",
                stacklevel=2,
            )
        total = cm.sum()
        return {
            "miou": float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan"),
            "oa": float(tp.sum() / total) if total else float("nan"),
            "macc": float(np.nanmean(acc)) if np.isfinite(acc).any() else float("nan"),
            "iou": {n: float(v) for n, v in zip(self.class_names, iou, strict=True)},
            "acc": {n: float(v) for n, v in zip(self.class_names, acc, strict=True)},
        }
