"""Sparse labels: the weak-label sampling protocol and the teacher's pseudo-labels."""

from __future__ import annotations

import math
import zlib

import numpy as np
import torch
from torch import Tensor

from ev_points.data.scene import IGNORE_INDEX, PointDataError, PointScene
from ev_points.ops import knn_points

__all__ = ["pseudo_labels", "sample_weak_labels", "weak_label_mask"]


def weak_label_mask(
    scene: PointScene,
    *,
    ratio: float | None = None,
    per_class: int | None = None,
    seed: int = 0,
) -> np.ndarray:
    """Which points of ``scene`` keep their label (boolean ``[P]``).

    ``ratio`` labels that fraction of the scene's labelled points, chosen uniformly at random
    (SQN/PSD protocol: "0.1 %" is ``ratio=0.001``; at least one point per scene);
    ``per_class`` labels that many random points of every class present instead. The choice
    depends only on ``seed`` and the scene name (reproducible, independent of scene order).
    """
    if (ratio is None) == (per_class is None):
        raise PointDataError("give exactly one of ratio / per_class for the weak labels")
    rng = np.random.default_rng([seed, zlib.crc32(scene.name.encode())])
    candidates = np.nonzero(scene.segment != IGNORE_INDEX)[0]
    mask = np.zeros(len(scene), dtype=bool)
    if len(candidates) == 0:
        return mask
    if ratio is not None:
        if not 0 < ratio <= 1:
            raise PointDataError(f"label ratio must be in (0, 1], got {ratio}")
        n = max(1, math.ceil(ratio * len(candidates) - 1e-9))
        mask[rng.choice(candidates, size=n, replace=False)] = True
        return mask
    if per_class is None or per_class < 1:
        raise PointDataError(f"per_class must be >= 1, got {per_class}")
    for c in np.unique(scene.segment[candidates]):
        members = candidates[scene.segment[candidates] == c]
        mask[rng.choice(members, size=min(per_class, len(members)), replace=False)] = True
    return mask


def sample_weak_labels(scene: PointScene, **kwargs: object) -> np.ndarray:
    """``scene.segment`` with every label outside :func:`weak_label_mask` set to -1."""
    mask = weak_label_mask(scene, **kwargs)  # type: ignore[arg-type]
    return np.where(mask, scene.segment, IGNORE_INDEX).astype(np.int64)


@torch.no_grad()
def pseudo_labels(
    probs: Tensor,
    xyz: Tensor,
    labels: Tensor,
    *,
    threshold: float = 0.9,
    propagate_k: int = 8,
) -> Tensor:
    """The teacher's targets for the unlabelled points.

    A point gets the teacher's argmax when its max probability is ``>= threshold``; a labelled
    point's label spreads to its ``propagate_k`` nearest neighbours where the teacher's argmax
    agrees with it (whatever the confidence); labelled points keep their label.

    Args:
        probs: ``[B, P, C]`` teacher probabilities (weak view).
        xyz: ``[B, P, 3]`` coordinates used for the neighbourhoods.
        labels: ``[B, P]`` sparse labels (-1 = unlabelled).

    Returns:
        ``[B, P]`` int64 pseudo-labels, -1 where none.
    """
    conf, guess = probs.max(-1)
    out = torch.where(conf >= threshold, guess, torch.full_like(guess, IGNORE_INDEX))
    if propagate_k > 0:
        for b in range(labels.shape[0]):
            seeds = (labels[b] >= 0).nonzero(as_tuple=True)[0]
            if len(seeds) == 0:
                continue
            k = min(propagate_k + 1, xyz.shape[1])
            nbr = knn_points(xyz[b : b + 1, seeds].float(), xyz[b : b + 1].float(), K=k).idx[
                0
            ]  # [S, k]
            seed_label = labels[b, seeds][:, None].expand_as(nbr)
            agree = guess[b][nbr] == seed_label
            out[b, nbr[agree]] = seed_label[agree]
    return torch.where(labels >= 0, labels, out)
