"""Sparse labels: the weak-label sampling protocol and the teacher's pseudo-labels."""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from ev_points.data.scene import IGNORE_INDEX, PointDataError, PointScene
from ev_points.ops import knn_points

__all__ = [
    "align_distribution",
    "class_balance_weights",
    "label_prior",
    "pseudo_labels",
    "sample_weak_labels",
    "weak_label_mask",
]


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


def label_prior(labels: Sequence[np.ndarray], num_classes: int, smoothing: float = 1.0) -> Tensor:
    """Class frequencies ``[C]`` of the labelled points (``-1`` ignored), Laplace-smoothed.

    Under the ratio protocol the labelled points are a uniform random sample of the scenes'
    points, so this is an unbiased estimate of the class frequencies; under N-per-class
    labelling it is uniform.
    """
    kept = [np.asarray(x).reshape(-1) for x in labels]
    flat = np.concatenate(kept) if kept else np.zeros(0, dtype=np.int64)
    flat = flat[flat >= 0].astype(np.int64)
    if len(flat) and flat.max() >= num_classes:
        raise PointDataError(f"label {int(flat.max())} >= num_classes={num_classes}")
    counts = np.bincount(flat, minlength=num_classes).astype(np.float64) + smoothing
    return torch.from_numpy(counts / counts.sum()).float()


def align_distribution(probs: Tensor, prior: Tensor, reference: Tensor | None = None) -> Tensor:
    """Distribution alignment (ReMixMatch): scale ``probs [..., C]`` by ``prior / reference``
    and renormalise, so that the teacher's average prediction is pulled towards ``prior [C]``
    instead of drifting towards the large, easy classes.

    Args:
        probs: teacher probabilities, classes last.
        prior: the target class distribution (e.g. :func:`label_prior`).
        reference: the teacher's average prediction ``[C]``, e.g. a running mean over recent
            batches; None: the mean of ``probs`` over all its points.
    """
    if reference is None:
        reference = probs.reshape(-1, probs.shape[-1]).mean(0)
    out = probs * (prior.to(probs) / reference.to(probs).clamp_min(1e-6))
    return out / out.sum(-1, keepdim=True)


def class_balance_weights(pseudo: Tensor, prior: Tensor) -> Tensor:
    """Per-class weights ``[C]`` for the cross-entropy on the pseudo-labels ``pseudo [N]``
    (no ``-1``): ``prior_c / share_c``, where ``share_c`` is class c's share of ``pseudo``,
    so each class weighs in proportion to its estimated frequency rather than to how often the
    teacher is confident about it (0 for classes absent from ``pseudo``)."""
    counts = torch.bincount(pseudo, minlength=prior.numel()).to(prior.dtype)
    share = counts / counts.sum().clamp_min(1)
    return torch.where(
        counts > 0, prior.to(share) / share.clamp_min(1e-12), torch.zeros_like(share)
    )
