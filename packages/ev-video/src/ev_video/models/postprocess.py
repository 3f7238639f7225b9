"""From head outputs to segments: decoding, Soft-NMS, and merging sliding windows.

:func:`soft_nms` follows the Soft-NMS of ActionFormer's THUMOS config (Gaussian decay
``score·exp(-IoU²/σ)``, σ 0.5; candidates below ``min_score`` are dropped; at most
``max_segments`` kept); with ``multiclass=True`` each class is suppressed separately.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["decode_segments", "pairwise_tiou", "soft_nms"]


def pairwise_tiou(a: Tensor, b: Tensor) -> Tensor:
    """tIoU of ``[N, 2]`` against ``[M, 2]`` segments → ``[N, M]`` (0 where the union is 0)."""
    inter = (
        torch.minimum(a[:, None, 1], b[None, :, 1]) - torch.maximum(a[:, None, 0], b[None, :, 0])
    ).clamp_min(0)
    union = (a[:, 1] - a[:, 0])[:, None] + (b[:, 1] - b[:, 0])[None] - inter
    return torch.where(union > 0, inter / union.clamp_min(1e-12), torch.zeros_like(inter))


def decode_segments(
    cls_logits: Tensor,
    distances: Tensor,
    points: Tensor,
    *,
    valid: float | None = None,
    min_score: float = 0.001,
    topk: int = 2000,
) -> tuple[Tensor, Tensor, Tensor]:
    """Candidates of one clip.

    Args:
        cls_logits: ``[P, K]``.
        distances: ``[P, 2]`` stride units.
        points: ``[P, 4]`` point table.
        valid: frames of the clip that are real video (segments are clipped to it).
        min_score: drop candidates scoring below.
        topk: keep the best ``topk`` (point, class) pairs.

    Returns:
        ``segments [M, 2]`` (input frames), ``scores [M]``, ``labels [M]``.
    """
    K = cls_logits.shape[-1]
    scores = cls_logits.float().sigmoid().flatten()
    keep = (scores > min_score).nonzero().squeeze(1)
    if keep.numel() > topk:
        keep = keep[scores[keep].topk(topk).indices]
    pts, labels = keep // K, keep % K
    c, s = points[pts, 0], points[pts, 1]
    d = distances[pts].float()
    seg = torch.stack([c - d[:, 0] * s, c + d[:, 1] * s], 1)
    hi = float(valid) if valid is not None else float("inf")
    seg = seg.clamp(min=0.0, max=hi)
    ok = (seg[:, 1] - seg[:, 0]) > 1e-3
    return seg[ok], scores[keep][ok], labels[ok]


def soft_nms(
    segments: Tensor,
    scores: Tensor,
    labels: Tensor,
    *,
    sigma: float = 0.5,
    min_score: float = 0.001,
    max_segments: int = 200,
    multiclass: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gaussian Soft-NMS.

    Repeatedly takes the best remaining candidate and multiplies the scores of the others (of
    the same class when ``multiclass``) by ``exp(-tIoU²/σ)``; candidates under ``min_score``
    are discarded.

    Args:
        segments: ``[M, 2]``.
        scores: ``[M]``.
        labels: ``[M]``.

    Returns:
        The kept ``(segments, scores, labels)`` by descending decayed score (≤ ``max_segments``).
    """
    if sigma <= 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    seg, sc, lab = segments.float().clone(), scores.float().clone(), labels.clone()
    out_s: list[Tensor] = []
    out_c: list[Tensor] = []
    out_l: list[Tensor] = []
    alive = sc >= min_score
    while alive.any() and len(out_c) < max_segments:
        masked = torch.where(alive, sc, torch.full_like(sc, -1.0))
        i = int(masked.argmax())
        out_s.append(seg[i])
        out_c.append(sc[i])
        out_l.append(lab[i])
        alive[i] = False
        iou = pairwise_tiou(seg[i : i + 1], seg)[0]
        decay = torch.exp(-(iou * iou) / sigma)
        if multiclass:
            decay = torch.where(lab == lab[i], decay, torch.ones_like(decay))
        sc = sc * decay
        alive &= sc >= min_score
    if not out_c:
        return segments.new_zeros(0, 2), scores.new_zeros(0), labels.new_zeros(0)
    return torch.stack(out_s), torch.stack(out_c), torch.stack(out_l)
