"""Naive loop references for the point ops, written for the tests from pytorch3d's documented
semantics (one query at a time, plain Python loops over the reference points)."""

from __future__ import annotations

import torch
from torch import Tensor


def _lengths(x: Tensor, lengths: Tensor | None) -> list[int]:
    return [x.shape[1]] * x.shape[0] if lengths is None else [int(v) for v in lengths]


def naive_knn(p1, p2, lengths1=None, lengths2=None, K=1, norm=2) -> tuple[Tensor, Tensor]:
    """Sorted by (distance, index); idx/dists 0 where padded."""
    n, P1, _ = p1.shape
    l1, l2 = _lengths(p1, lengths1), _lengths(p2, lengths2)
    dists = p1.new_zeros(n, P1, K)
    idx = torch.zeros(n, P1, K, dtype=torch.int64)
    for b in range(n):
        for i in range(l1[b]):
            row = []
            for j in range(l2[b]):
                diff = p1[b, i] - p2[b, j]
                d = (diff * diff).sum() if norm == 2 else diff.abs().sum()
                row.append((float(d), j))
            row.sort()
            for k, (_, j) in enumerate(row[:K]):
                idx[b, i, k] = j
                diff = p1[b, i] - p2[b, j]
                dists[b, i, k] = (diff * diff).sum() if norm == 2 else diff.abs().sum()
    return dists, idx


def naive_ball_query(p1, p2, lengths1=None, lengths2=None, K=4, radius=0.2):
    n, P1, _ = p1.shape
    l1, l2 = _lengths(p1, lengths1), _lengths(p2, lengths2)
    dists = p1.new_zeros(n, P1, K)
    idx = torch.full((n, P1, K), -1, dtype=torch.int64)
    r2 = torch.tensor(radius, dtype=p1.dtype) ** 2
    for b in range(n):
        for i in range(l1[b]):
            k = 0
            for j in range(l2[b]):
                if k == K:
                    break
                diff = p1[b, i] - p2[b, j]
                d = (diff * diff).sum()
                if d < r2:
                    idx[b, i, k] = j
                    dists[b, i, k] = d
                    k += 1
    return dists, idx


def naive_fps(points, lengths=None, K=4, start=None):
    n = points.shape[0]
    ls = _lengths(points, lengths)
    ks = [K] * n if isinstance(K, int) else [int(k) for k in K]
    out = torch.full((n, max(ks)), -1, dtype=torch.int64)
    for b in range(n):
        kn = min(ks[b], ls[b])
        if kn == 0:
            continue
        sel = 0 if start is None else int(start[b])
        best = [float("inf")] * ls[b]
        out[b, 0] = sel
        pts = points[b].float()
        for i in range(1, kn):
            top, top_j = -1.0, 0
            for j in range(ls[b]):
                diff = pts[sel] - pts[j]
                d = float((diff[0] * diff[0] + diff[1] * diff[1]) + diff[2] * diff[2])
                best[j] = min(best[j], d)
                if best[j] > top:
                    top, top_j = best[j], j
            sel = top_j
            out[b, i] = sel
    return out
