"""Proposal metric: average recall vs average number of proposals per video (AR@AN).

ActivityNet's ``eval_proposal`` semantics:

* the videos are those of the ground truth; ``max_avg_proposals`` (AN) defaults to the mean
  number of proposals per video;
* each video keeps its top ``min(int(n_v * ratio), n_v)`` proposals by score, with
  ``ratio = AN * n_videos / n_proposals`` (a video without proposals counts only misses);
* at 100 budgets ``pcn = (1..100)/100 * AN * n_videos / kept``, a video uses its first
  ``min(int(kept_v * pcn), kept_v)`` proposals; a ground truth is recalled at threshold ``t``
  when one of them has tIoU ≥ t; recall = recalled / all ground truth;
* AR is the recall averaged over the thresholds; ``AR@AN`` is its last point; the area under
  the AR-AN curve (trapezoids) divided by the last AN is ActivityNet's AUC score.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ev_video.errors import AnnotationError
from ev_video.evaluation.segments import check_records, segment_iou

__all__ = ["ProposalResult", "evaluate_proposals"]


@dataclass
class ProposalResult:
    """Average recall against the average number of proposals per video.

    Attributes:
        recall: ``[len(tiou_thresholds), 100]`` recall per threshold and budget.
        average_recall: ``[100]`` recall averaged over thresholds.
        proposals_per_video: ``[100]`` the average number of proposals (AN) of each budget.
        tiou_thresholds: the thresholds.
    """

    recall: np.ndarray
    average_recall: np.ndarray
    proposals_per_video: np.ndarray
    tiou_thresholds: tuple[float, ...]

    @property
    def ar_at_an(self) -> float:
        """AR at the largest budget (``AR@AN`` with AN = ``max_avg_proposals``)."""
        return float(self.average_recall[-1])

    @property
    def auc(self) -> float:
        """Area under the AR-AN curve divided by the largest AN (ActivityNet's score, in [0, 1])."""
        last = float(self.proposals_per_video[-1])
        if last <= 0:
            return 0.0
        trapezoid = getattr(np, "trapezoid", None) or getattr(np, "trapz")  # noqa: B009  (NumPy < 2 names it trapz)
        return float(trapezoid(self.average_recall, self.proposals_per_video)) / last

    def ar_at(self, an: float) -> float:
        """AR at the first budget whose AN is ≥ ``an`` (the last one if none)."""
        idx = int(np.searchsorted(self.proposals_per_video, an - 1e-9))
        return float(self.average_recall[min(idx, len(self.average_recall) - 1)])


def evaluate_proposals(
    ground_truth: Iterable[Mapping[str, Any]],
    proposals: Iterable[Mapping[str, Any]],
    tiou_thresholds: Sequence[float] = tuple(np.linspace(0.5, 0.95, 10)),
    max_avg_proposals: float | None = None,
) -> ProposalResult:
    """AR@AN of class-agnostic proposals (labels, if present, are ignored).

    Args:
        ground_truth: records ``{"video_id", "t_start", "t_end"}``.
        proposals: records with ``"score"``.
        tiou_thresholds: thresholds averaged into AR (ActivityNet's 0.5:0.05:0.95 by default).
        max_avg_proposals: AN of the last budget (e.g. 100); default: proposals per video.

    Returns:
        A :class:`ProposalResult`.

    Raises:
        AnnotationError: malformed records, no ground truth or no proposals.
    """
    gt = check_records(ground_truth, "ground_truth", score=False, label=False)
    props = check_records(proposals, "proposals", score=True, label=False)
    if not gt:
        raise AnnotationError("evaluate_proposals needs at least one ground-truth segment")
    if not props:
        raise AnnotationError("evaluate_proposals needs at least one proposal")
    thresholds = np.asarray(tiou_thresholds, dtype=np.float64)
    videos = list(dict.fromkeys(g["video_id"] for g in gt))
    gt_v: dict[str, list[dict[str, Any]]] = defaultdict(list)
    pr_v: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for g in gt:
        gt_v[g["video_id"]].append(g)
    for p in props:
        pr_v[p["video_id"]].append(p)
    an = float(max_avg_proposals) if max_avg_proposals else len(props) / len(videos)
    ratio = an * len(videos) / len(props)
    ious: list[np.ndarray] = []
    total = 0
    for vid in videos:
        segs = np.array([[g["t_start"], g["t_end"]] for g in gt_v[vid]])
        mine = pr_v.get(vid, [])
        if not mine:
            ious.append(np.zeros((len(segs), 1)))
            continue
        order = np.argsort([p["score"] for p in mine], kind="stable")[::-1]
        cand = np.array([[mine[i]["t_start"], mine[i]["t_end"]] for i in order])
        keep = min(int(len(cand) * ratio), len(cand))
        total += keep
        cand = cand[:keep]
        ious.append(
            np.stack([segment_iou(s, cand) for s in segs]) if keep else np.zeros((len(segs), 0))
        )
    if total == 0:
        raise AnnotationError(f"max_avg_proposals={an} keeps no proposal in any video")
    pcn = np.arange(1, 101) / 100.0 * (an * len(videos) / total)
    positives = sum(m.shape[0] for m in ious)
    recall = np.empty((len(thresholds), len(pcn)))
    for r, thr in enumerate(thresholds):
        matches = np.zeros(len(pcn))
        for m in ious:
            hit = m >= thr
            budgets = np.minimum((m.shape[1] * pcn).astype(int), m.shape[1])
            for j, k in enumerate(budgets):
                matches[j] += np.count_nonzero(hit[:, :k].sum(axis=1))
        recall[r] = matches / positives
    return ProposalResult(
        recall=recall,
        average_recall=recall.mean(axis=0),
        proposals_per_video=pcn * (total / len(videos)),
        tiou_thresholds=tuple(float(t) for t in thresholds),
    )
