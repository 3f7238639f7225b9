"""Exact k-NN and ball-query *indices* on the CPU from a kd-tree (``scipy.spatial.cKDTree``).

The tree (float64 copies of the coordinates, one tree per cloud of ``p2``) proposes candidates
in O(log P) per query instead of the O(P) scan of a brute-force kernel. pytorch3d's decisions
-- the K smallest (distance, index) pairs; the strict ``dist² < radius²`` test -- are then made
again on the candidates in the inputs' dtype with pytorch3d's arithmetic
(:func:`~ev_points.ops._common.pair_dists`), so ties and points on the radius fall the same way.

k-NN: a row is accepted only when a float error bound proves that no point outside its
candidates can enter its K (every such point is at least as far as the last candidate in
float64); otherwise the row is queried again with twice as many candidates, up to the whole
cloud. Duplicate points and boundary ties therefore cost time, never correctness.

Ball query: pytorch3d returns the first K points *in index order* inside the ball, not the
nearest, so a row needs every point of its (slightly enlarged) ball. One dual-tree traversal
(a tree over the query rows against the cloud's tree, ``sparse_distance_matrix``) lists all
pairs within the enlarged radius; pairs whose float64 distance is too close to the radius to
decide are tested with pytorch3d's arithmetic; a sort by (row, index) then gives each row's
first K. The rows go in blocks whose pair count is bounded by ``chunk`` (an upper bound from a
grid of radius-wide cells). A cloud queried against itself (``p1`` and ``p2`` the same tensor)
uses the tree's self-join instead (``query_pairs``: each pair once, about three times cheaper).
When a sample of rows shows balls much larger than K (a radius large for the density), rows
are handled one by one instead: rows with a small ball fetch it with a bounded k-NN query, the
others scan ``p2`` in index order, block by block, and stop at K hits -- pytorch3d's own early
stop, cheaper there than enumerating a big ball.

The kd-tree path serves point clouds (``1 <= D <= 3``); higher-dimensional inputs (features)
go to the brute-force path, where a kd-tree stops paying. Candidate blocks hold at most
``chunk`` entries (the caller's ``CHUNK_ELEMENTS``). The tree queries use
``torch.get_num_threads()`` workers.
"""

from __future__ import annotations

import functools
import importlib
import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ev_points.ops._common import error_bounds, pair_dists, sort_by_dist_then_index

__all__ = [
    "ball_query_idx",
    "knn_idx",
    "scipy_import_error",
    "unavailable",
    "worthwhile",
    "worthwhile_shape",
]

#: Smallest reference cloud (``P2``), query set (``P1``) and ``P1 * P2`` for which the tree
#: pays for its construction; below any, the brute-force torch path is faster (crossover
#: measured at batch 8, K=16 on the benchmark machine: see BENCHMARKS.md).
MIN_POINTS = 512
MIN_QUERIES = 64
MIN_PAIRS = 1 << 18
#: Extra k-NN candidates beyond K fetched on the first query of a row (a row whose K-th and
#: (K + SLACK)-th distances are too close to separate is queried again with more).
SLACK = 2
#: Ball-query rows with more than ``max(DENSE_RATIO * K, DENSE_MIN)`` points in the enlarged
#: ball are answered by the early-stopping index-order scan instead of the tree.
DENSE_RATIO = 4
DENSE_MIN = 64
#: Smallest p2 block of the index-order scan.
_SCAN_MIN = 256
#: Rows whose ball sizes are sampled to choose between the pair and the per-row routes.
_SAMPLE_ROWS = 256


@functools.cache
def scipy_import_error() -> str | None:
    """Why ``scipy.spatial.cKDTree`` cannot be imported (None when it can)."""
    try:
        importlib.import_module("scipy.spatial").cKDTree  # noqa: B018
    except Exception as exc:  # ImportError, or a broken binary
        return f"scipy.spatial is not importable ({type(exc).__name__}: {exc})"
    return None


def unavailable(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why the kd-tree path cannot serve inputs on ``device`` with ``dtype`` (None when it can)."""
    if device.type != "cpu":
        return f"the kd-tree path runs on the CPU, inputs are on {device.type!r}"
    if dtype not in (torch.float32, torch.float64):
        return f"the kd-tree path supports float32 and float64, got {dtype}"
    return scipy_import_error()


def worthwhile_shape(P1: int, P2: int, d: int) -> bool:
    """Whether the tree is expected to beat brute force for ``P1`` queries into ``P2`` points of
    dimension ``d``: point clouds (D <= 3) with enough points."""
    return 1 <= d <= 3 and P2 >= MIN_POINTS and P1 >= MIN_QUERIES and P1 * P2 >= MIN_PAIRS


def worthwhile(p1: Tensor, p2: Tensor) -> bool:
    """:func:`worthwhile_shape` for ``p1 [N, P1, D]`` / ``p2 [N, P2, D]``, and finite
    coordinates (which a kd-tree needs; non-finite inputs keep the brute-force semantics)."""
    if not worthwhile_shape(p1.shape[1], p2.shape[1], p1.shape[2]):
        return False
    return bool(torch.isfinite(p1).all()) and bool(torch.isfinite(p2).all())


def _float64(points: Tensor) -> np.ndarray:
    return np.ascontiguousarray(points.numpy(), dtype=np.float64)


def _tree(data: np.ndarray) -> Any:
    """A kd-tree over float64 ``data [P, D]`` (sliding-midpoint splits: the fastest build)."""
    kd = importlib.import_module("scipy.spatial").cKDTree
    return kd(data, leafsize=16, balanced_tree=False, compact_nodes=False, copy_data=False)


def _spatial_order(q64: np.ndarray) -> Tensor:
    """The rows of ``q64`` in the order of a kd-tree over them: neighbouring queries run one
    after the other, which keeps the tree's nodes in cache (about 20 % faster at 64k)."""
    return torch.from_numpy(_tree(q64).indices.astype(np.int64))


def _workers() -> int:
    return max(1, torch.get_num_threads())


def _query(tree: Any, q: np.ndarray, k: int, **kwargs: Any) -> tuple[np.ndarray, Tensor]:
    dist, ind = tree.query(q, k=k, workers=_workers(), **kwargs)
    return dist.reshape(len(q), k), torch.from_numpy(ind.reshape(len(q), k).astype(np.int64))


@torch.no_grad()
def knn_idx(
    p1: Tensor, p2: Tensor, lengths1: Tensor, lengths2: Tensor, norm: int, K: int, chunk: int
) -> Tensor:
    """Indices ``[N, P1, K]`` of the K nearest valid ``p2`` points: ascending (distance, index),
    0 where padded (``k >= lengths2`` and rows ``>= lengths1``)."""
    n, P1, d = p1.shape
    idx = torch.zeros(n, P1, K, dtype=torch.int64)
    bounds = error_bounds(p1.dtype, d)
    for b in range(n):
        l1, l2 = int(lengths1[b]), int(lengths2[b])
        if l1 == 0 or l2 == 0:
            continue
        ref, qry = p2[b, :l2].detach(), p1[b, :l1].detach()
        q64 = _float64(qry)
        kk = min(K, l2)
        rows = _spatial_order(q64)
        kc = min(kk + SLACK, l2)
        tree = _tree(_float64(ref))
        while rows.numel():  # rows whose K could not be proven yet, with twice the candidates
            rows = _knn_rows(tree, q64, qry, ref, rows, kc, kk, norm, chunk, bounds, idx[b])
            kc = min(2 * kc, l2)
    return idx


def _knn_rows(
    tree: Any,
    q64: np.ndarray,
    qry: Tensor,
    ref: Tensor,
    rows: Tensor,
    kc: int,
    kk: int,
    norm: int,
    chunk: int,
    bounds: tuple[float, float],
    out: Tensor,
) -> Tensor:
    """Answer ``rows`` from their ``kc`` tree candidates into ``out``; return the rows left."""
    rel, tiny = bounds
    complete = kc >= ref.shape[0]  # every point is a candidate: nothing to prove
    left = []
    step = max(1, chunk // kc)
    for s in range(0, rows.numel(), step):
        r = rows[s : s + step]
        dist, cand = _query(tree, q64[r.numpy()], kc, p=norm)
        dw, cand = _sort_rows(pair_dists(qry[r, None, :], ref[cand], norm), cand)
        if complete:
            out[r, :kk] = cand[:, :kk]
            continue
        # any non-candidate is at least as far as the last candidate (float64, tree order)
        last = torch.from_numpy(dist[:, -1])
        floor = (last * last if norm == 2 else last) * (1.0 - rel) - tiny
        proven = floor > dw[:, kk - 1].to(torch.float64)
        out[r[proven], :kk] = cand[proven, :kk]
        left.append(r[~proven])
    return torch.cat(left) if left else rows[:0]


def _sort_rows(d: Tensor, i: Tensor) -> tuple[Tensor, Tensor]:
    """Rows sorted by (distance, index). float32 distances (>= 0, so their bit patterns order
    like the values) and indices pack into one int64 key: one sort instead of two."""
    if d.dtype != torch.float32:
        return sort_by_dist_then_index(d, i)
    bits = (d + 0.0).view(torch.int32).to(torch.int64)  # + 0.0 turns -0.0 into +0.0
    key = (bits << 32 | i).sort(dim=1).values
    return (key >> 32).to(torch.int32).view(torch.float32), key & 0xFFFFFFFF


@torch.no_grad()
def ball_query_idx(
    p1: Tensor,
    p2: Tensor,
    lengths1: Tensor,
    lengths2: Tensor,
    K: int,
    radius: float,
    chunk: int,
) -> Tensor:
    """First K indices, in index order, of valid ``p2`` points with ``dist² < radius²``
    (squared radius and distances in the inputs' dtype); ``[N, P1, K]`` padded with -1."""
    n, P1, d = p1.shape
    idx = torch.full((n, P1, K), -1, dtype=torch.int64)
    ball = _Ball(K, torch.tensor(radius, dtype=p1.dtype).square(), *error_bounds(p1.dtype, d))
    dense = max(DENSE_RATIO * K, DENSE_MIN)
    # the same tensor on both sides: each cloud queried against itself
    same = p1.data_ptr() == p2.data_ptr() and p1.shape == p2.shape and p1.stride() == p2.stride()
    for b in range(n):
        l1, l2 = int(lengths1[b]), int(lengths2[b])
        if l1 == 0 or l2 == 0:
            continue
        ref, qry = p2[b, :l2].detach(), p1[b, :l1].detach()
        q64 = _float64(qry)
        tree = _tree(_float64(ref))
        pick = np.linspace(0, l1 - 1, num=min(l1, _SAMPLE_ROWS)).astype(np.int64)
        if int(_count(tree, q64[pick], ball.loose).max()) > dense:
            # balls much larger than K: per-row routing (early-stopping scans where dense)
            rows = _spatial_order(q64).numpy()
            _ball_by_rows(tree, q64, qry, ref, rows, ball, dense, chunk, idx[b])
            continue
        if l1 * l2 <= chunk:  # even all pairs fit
            if same and l1 == l2:
                _ball_self(tree, ref, ball, idx[b])
            else:
                _ball_by_pairs(tree, q64, qry, ref, np.arange(l1), ball, idx[b])
            continue
        bound, cell = _pair_bounds(qry, ref, ball.loose)
        if same and l1 == l2 and int(bound.sum()) <= 2 * chunk:  # it keeps each pair once
            _ball_self(tree, ref, ball, idx[b])
            continue
        # blocks of spatially close rows whose pair counts are bounded by `chunk`
        order = torch.argsort(cell)
        order = order[bound[order] > 0]  # rows with no point nearby have no pairs
        heavy = bound[order] > chunk // 4
        if heavy.any():
            _ball_by_rows(tree, q64, qry, ref, order[heavy].numpy(), ball, dense, chunk, idx[b])
            order = order[~heavy]
        block = torch.cumsum(bound[order], 0).div(chunk, rounding_mode="floor")
        for part in torch.split(
            order, torch.unique_consecutive(block, return_counts=True)[1].tolist()
        ):
            _ball_by_pairs(tree, q64, qry, ref, part.numpy(), ball, idx[b])
    return idx


class _Ball:
    """The radius test: ``r2`` in the inputs' dtype, the enlarged float64 radius ``loose`` that
    holds every point passing it, and the float64 band ``[lo, hi]`` of squared tree distances
    that needs the exact test (below ``lo`` a pair passes, above ``hi`` it fails)."""

    def __init__(self, K: int, r2: Tensor, rel: float, tiny: float) -> None:
        self.K, self.r2 = K, r2
        self.lo = float(r2) * (1.0 - 2.0 * rel) - tiny
        self.hi = (float(r2) + tiny) * (1.0 + 2.0 * rel)
        self.loose = math.sqrt(self.hi) * (1.0 + 1e-9)


def _count(tree: Any, q: np.ndarray, radius: float) -> Tensor:
    counts = tree.query_ball_point(q, radius, return_length=True, workers=_workers())
    return torch.from_numpy(np.asarray(counts, dtype=np.int64).reshape(len(q)))


def _ball_by_pairs(
    tree: Any, q64: np.ndarray, qry: Tensor, ref: Tensor, rows: np.ndarray, ball: _Ball, out: Tensor
) -> None:
    """All (row, point) pairs within ``ball.loose`` from one dual-tree traversal (a tree over the
    query rows against the cloud's tree), then the first K inside per row, in index order."""
    qtree = _tree(q64[rows])
    pairs = qtree.sparse_distance_matrix(tree, ball.loose, output_type="ndarray")
    i, j, v2 = pairs["i"], pairs["j"], np.square(pairs["v"])
    inside = v2 < ball.lo
    near = np.flatnonzero((v2 >= ball.lo) & (v2 <= ball.hi))
    if near.size:  # the float64 distance cannot decide these: pytorch3d's test
        a, c = torch.from_numpy(rows[i[near]]), torch.from_numpy(j[near])
        inside[near] = (pair_dists(qry[a], ref[c], 2) < ball.r2).numpy()
    out[torch.from_numpy(rows)] = _first_k(i[inside], j[inside], rows.size, ball.K)


def _ball_self(tree: Any, ref: Tensor, ball: _Ball, out: Tensor) -> None:
    """A cloud against itself: the tree's self-join (``query_pairs``, each pair once) is about
    three times cheaper than the dual traversal; every pair is tested with pytorch3d's
    arithmetic (symmetric: the same bits both ways) and counts for both rows."""
    pairs = tree.query_pairs(ball.loose, output_type="ndarray")
    i, j = pairs[:, 0], pairs[:, 1]
    a, c = torch.from_numpy(i), torch.from_numpy(j)
    keep = (pair_dists(ref[a], ref[c], 2) < ball.r2).numpy()
    i, j = i[keep], j[keep]
    n = ref.shape[0]
    own = np.arange(n) if float(ball.r2) > 0 else np.zeros(0, np.int64)  # dist 0 < r²
    rows, cols = np.concatenate([i, j, own]), np.concatenate([j, i, own])
    out[:n] = _first_k(rows, cols, n, ball.K)


def _first_k(i: np.ndarray, j: np.ndarray, n_rows: int, K: int) -> Tensor:
    """``[n_rows, K]``: for each row, the K smallest ``j`` of its pairs ``(i, j)`` ascending,
    padded with -1. Pairs are grouped by row with a stable radix sort (``i`` as uint16 when it
    fits), laid out in a dense ``[n_rows, widest row]`` block and sorted along rows; a global
    sort of ``(i << 32 | j)`` when one wide row would make that block large."""
    out = np.full((n_rows, K), -1, dtype=np.int64)
    count = np.bincount(i, minlength=n_rows)
    width = int(count.max()) if count.size else 0
    if width == 0:
        return torch.from_numpy(out)
    start = np.cumsum(count) - count
    if n_rows * width <= 4 * i.size + 4096:
        order = np.argsort(i.astype(np.uint16) if n_rows <= 1 << 16 else i, kind="stable")
        i, j = i[order], j[order]
        block = np.full((n_rows, width), np.iinfo(np.int64).max, dtype=np.int64)
        block[i, np.arange(i.size) - start[i]] = j
        block.sort(axis=1)
        first = block[:, :K]
        out[:, : first.shape[1]] = np.where(first == np.iinfo(np.int64).max, -1, first)
    else:
        key = np.sort((i.astype(np.int64) << 32) | j)
        i, j = key >> 32, key & 0xFFFFFFFF
        rank = np.arange(key.size) - start[i]
        keep = rank < K
        out[i[keep], rank[keep]] = j[keep]
    return torch.from_numpy(out)


def _pair_bounds(qry: Tensor, ref: Tensor, radius: float) -> tuple[Tensor, Tensor]:
    """Per query row, an upper bound on the points of ``ref`` within ``radius`` (the points in
    the 3^D grid cells around its cell; cells at least ``radius`` wide, at most ~4 per point),
    and the row's cell as a linear index (sorting by it groups nearby rows). ``D <= 3``."""
    d = ref.shape[1]
    x, q = ref.to(torch.float64), qry.to(torch.float64)
    lo = x.amin(0)
    extent = (x.amax(0) - lo).clamp_min(0.0)
    h = radius * (1.0 + 1e-6)
    cells = torch.floor(extent / h) + 1
    limit = 4.0 * ref.shape[0] + 64.0
    if float(cells.prod()) > limit:  # coarser cells: still a valid bound, less memory
        h *= (float(cells.prod()) / limit) ** (1.0 / d)
        cells = torch.floor(extent / h) + 1
    dims = [int(c) for c in cells.tolist()]
    cx = torch.floor((x - lo) / h).long().clamp_min(0)
    cx = torch.minimum(cx, torch.tensor(dims) - 1)
    grid = torch.zeros(dims, dtype=torch.int64).index_put_(
        tuple(cx.t()), torch.ones(len(cx), dtype=torch.int64), accumulate=True
    )
    # box sum over the 3^D neighbourhood, with a ring of zero cells around the grid
    grid = torch.nn.functional.pad(grid, [2, 2] * d)
    for axis in range(d):
        n = grid.shape[axis]
        grid = (
            grid.narrow(axis, 0, n - 2) + grid.narrow(axis, 1, n - 2) + grid.narrow(axis, 2, n - 2)
        )
    cq = torch.floor((q - lo) / h).clamp(-2.0, float(max(dims)) + 2.0).long() + 1  # ringed grid
    inside = ((cq >= 0) & (cq < torch.tensor(grid.shape))).all(1)
    cq = torch.minimum(cq.clamp_min(0), torch.tensor(grid.shape) - 1)
    bound = torch.where(inside, grid[tuple(cq.t())], 0)
    stride = torch.tensor([math.prod(grid.shape[a + 1 :]) for a in range(d)])
    return bound, (cq * stride).sum(1)


def _ball_by_rows(
    tree: Any,
    q64: np.ndarray,
    qry: Tensor,
    ref: Tensor,
    rows: np.ndarray,
    ball: _Ball,
    dense: int,
    chunk: int,
    out: Tensor,
) -> None:
    """Count each row's ball; rows of at most ``dense`` points fetch them all with one bounded
    k-NN query per power-of-two width, larger ones scan ``ref`` in index order (early stop)."""
    rows_t = torch.from_numpy(rows)
    counts = _count(tree, q64[rows], ball.loose)
    sparse = (counts > 0) & (counts <= dense)
    width = torch.where(counts > 1, 2 ** torch.ceil(torch.log2(counts.double())), 1.0)
    for kb in torch.unique(width[sparse]).tolist():
        _ball_fetch(tree, q64, qry, ref, rows_t[sparse & (width == kb)], int(kb), ball, chunk, out)
    if (counts > dense).any():
        big = counts > dense
        _ball_scan(qry, ref, rows_t[big], counts[big], ball, chunk, out)


def _ball_fetch(
    tree: Any,
    q64: np.ndarray,
    qry: Tensor,
    ref: Tensor,
    rows: Tensor,
    kb: int,
    ball: _Ball,
    chunk: int,
    out: Tensor,
) -> None:
    """Rows whose enlarged ball holds at most ``kb`` points: fetch them all (a bounded k-NN
    query), keep the first K inside in index order."""
    l2 = ref.shape[0]
    kb = min(kb, l2)
    step = max(1, chunk // kb)
    for s in range(0, rows.numel(), step):
        r = rows[s : s + step]
        _, cand = _query(tree, q64[r.numpy()], kb, distance_upper_bound=ball.loose)
        found = cand < l2  # missing neighbours come back as index l2
        dw = pair_dists(qry[r, None, :], ref[cand.clamp_max(l2 - 1)], 2)
        key = torch.where(found & (dw < ball.r2), cand, l2)
        first = key.topk(min(ball.K, kb), dim=1, largest=False, sorted=True).values
        out[r, : first.shape[1]] = torch.where(first < l2, first, -1)


def _ball_scan(
    qry: Tensor, ref: Tensor, rows: Tensor, counts: Tensor, ball: _Ball, chunk: int, out: Tensor
) -> None:
    """Dense rows: scan ``ref`` in index order in growing blocks, stopping at K hits per row."""
    K, l2 = ball.K, ref.shape[0]
    res = torch.full((rows.numel(), K), -1, dtype=torch.int64)
    have = torch.zeros(rows.numel(), dtype=torch.int64)
    live = torch.arange(rows.numel())
    # expected scan length for K hits: K · l2 / count (twice that, for the typical row)
    block = max(_SCAN_MIN, int(2 * K * l2 / max(1, int(counts.median()))))
    start = 0
    while start < l2 and live.numel():
        size = min(l2 - start, block, max(_SCAN_MIN, chunk // live.numel()))
        dw = pair_dists(qry[rows[live], None, :], ref[None, start : start + size], 2)
        inside = dw < ball.r2
        rank = inside.cumsum(1) + have[live, None]
        rr, cc = (inside & (rank <= K)).nonzero(as_tuple=True)
        res[live[rr], rank[rr, cc] - 1] = start + cc
        have[live] = rank[:, -1].clamp_max(K)
        live = live[have[live] < K]
        start += size
        block *= 2
    out[rows] = res
