"""The ``native`` backend: ev-points' own implementation, exact to pytorch3d's semantics.

Neighbour *selection* (no autograd) takes one of two paths:

* CPU, float32/float64, clouds of at least a few hundred points: a kd-tree per cloud
  (:mod:`ev_points.ops._kdtree`, ``scipy.spatial.cKDTree``) proposes candidates and pytorch3d's
  decisions are re-made on them in the inputs' dtype -- O(P log P) instead of O(P1·P2);
* everywhere else (CUDA, float16/bfloat16, small clouds, non-finite inputs, scipy missing):
  brute force on blocks of query rows (at most ``CHUNK_ELEMENTS`` pairwise distances live at
  once): candidates from a matmul distance, an exact re-rank in the inputs' dtype, and an
  exact pass over all points for the rows an error bound cannot prove (ties at the K-th).

The returned distances are then recomputed from the selected pairs with autograd and
pytorch3d's arithmetic, so values are bit-identical to its CPU kernels in float32 and gradients
reach ``p1`` and ``p2`` through ``dists`` exactly as its backward kernels send them. Every op
supports ragged batches through ``lengths`` and follows pytorch3d's padding and tie rules.
:func:`selection_path` says which path a call takes, and why.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ev_points.ops import _kdtree
from ev_points.ops._common import error_bounds, pair_dists, sort_by_dist_then_index

__all__ = [
    "ball_dists",
    "ball_query",
    "knn_dists",
    "knn_points",
    "sample_farthest_points",
    "selection_path",
]

#: Upper bound on pairwise distances materialised at once (elements, per op call).
CHUNK_ELEMENTS = 1 << 23
#: Extra candidates taken from the fast (matmul) distances before exact re-ranking.
_SLACK = 8


def _row_chunks(n: int, p1: int, p2: int) -> int:
    return max(1, min(p1, CHUNK_ELEMENTS // max(1, n * p2)))


def _centered(p1: Tensor, p2: Tensor, lengths2: Tensor) -> tuple[Tensor, Tensor]:
    """Shift both clouds by p2's valid centroid (reduces cancellation in the matmul form)."""
    valid = (torch.arange(p2.shape[1], device=p2.device)[None] < lengths2[:, None]).to(p2.dtype)
    count = valid.sum(1, keepdim=True).clamp_min(1)[..., None]
    center = (p2 * valid[..., None]).sum(1, keepdim=True) / count
    return p1 - center, p2 - center


def _augment(p: Tensor) -> Tensor:
    """``[-2 p, |p|²]ᵀ`` as ``[N, D + 1, P]``: one matmul with ``[q, 1]`` gives ``|p|² - 2 q·p``."""
    return torch.cat([-2.0 * p, (p * p).sum(-1, keepdim=True)], -1).transpose(1, 2).contiguous()


def _approx_dists(q: Tensor, p: Tensor, p_aug: Tensor, norm: int) -> Tensor:
    """Fast ``[N, c, P2]`` distances used only to pick candidates; for norm 2 they lack the
    per-row constant ``|q|²`` (rank-preserving)."""
    if norm == 2:
        return torch.bmm(torch.cat([q, torch.ones_like(q[..., :1])], -1), p_aug)
    return torch.cdist(q, p, p=1.0)


@torch.no_grad()
def _knn_idx(
    p1: Tensor, p2: Tensor, lengths1: Tensor, lengths2: Tensor, norm: int, K: int
) -> Tensor:
    """Indices ``[N, P1, K]`` of the K nearest valid p2 points, ascending, ties to the lower index.

    Candidates come from fast distances (matmul form / ``cdist``, in float32 at least); a row
    is kept only when an error bound proves that no other point can enter its K in the inputs'
    dtype (ties at the K-th distance, duplicates); the other rows are ranked exactly over all
    their points.
    """
    n, P1, D = p1.shape
    P2 = p2.shape[1]
    idx = torch.zeros(n, P1, K, dtype=torch.int64, device=p1.device)
    kk = min(K, P2)
    if kk == 0 or P1 == 0:
        return idx
    work = torch.float32 if p1.dtype in (torch.float16, torch.bfloat16) else p1.dtype
    q_all, p = _centered(p1.to(work), p2.to(work), lengths2)
    invalid = torch.arange(P2, device=p1.device)[None, None, :] >= lengths2[:, None, None]
    p_aug = _augment(p) if norm == 2 else p
    ragged = bool((lengths2 < P2).any())
    kc = min(kk + _SLACK, P2)
    # |fast - true| <= slack (the matmul form loses ~eps·(|q|² + |p|²)), and the exact
    # distances in the inputs' dtype are within rel·true + tiny of the true ones
    if norm == 2:
        big = float((q_all * q_all).sum(-1).max()) + float((p * p).sum(-1).max())
    else:
        big = D * (float(q_all.abs().max()) + float(p.abs().max()))
    slack = 16.0 * (D + 2) * torch.finfo(work).eps * big
    rel, tiny = error_bounds(p1.dtype, D)
    complete = lengths2[:, None] <= kc  # every valid point is a candidate
    rows = torch.arange(P1, device=p1.device)[None, :] >= lengths1[:, None]  # padded rows
    unproven = torch.zeros(n, P1, dtype=torch.bool, device=p1.device)
    step = _row_chunks(n, P1, P2)
    for s in range(0, P1, step):
        q = q_all[:, s : s + step]
        approx = _approx_dists(q, p, p_aug, norm)
        if norm == 2:
            approx = approx + (q * q).sum(-1, keepdim=True)
        if ragged:
            approx.masked_fill_(invalid, float("inf"))
        top = approx.topk(kc, dim=2, largest=False, sorted=False)
        cand = top.indices
        nn = p2.gather(1, cand.reshape(n, -1, 1).expand(-1, -1, p2.shape[2]))
        exact = pair_dists(p1[:, s : s + step, None], nn.reshape(*cand.shape, -1), norm)
        exact = exact.masked_fill(cand >= lengths2[:, None, None], float("inf"))
        exact, cand = sort_by_dist_then_index(exact, cand)
        idx[:, s : s + step, :kk] = cand[..., :kk]
        # every other point has a fast distance >= the largest candidate's
        floor = (top.values.amax(-1).double() - slack) * (1.0 - rel) - tiny
        proven = exact[..., kk - 1].double() < floor
        proven |= complete | rows[:, s : s + step]
        unproven[:, s : s + step] = ~proven
    if bool(unproven.any()):
        _knn_exact_rows(p1, p2, lengths2, norm, kk, unproven.nonzero(as_tuple=True), idx)
    # pad: k >= lengths2 and rows i >= lengths1 hold index 0
    pad = torch.arange(K, device=p1.device)[None, None, :] >= lengths2[:, None, None]
    return idx.masked_fill_(pad | rows[..., None], 0)


def _knn_exact_rows(
    p1: Tensor, p2: Tensor, lengths2: Tensor, norm: int, kk: int, where: tuple, idx: Tensor
) -> None:
    """Rank rows ``where = (b, i)`` over all their points in the inputs' dtype."""
    P2 = p2.shape[1]
    positions = torch.arange(P2, device=p1.device)
    step = max(1, CHUNK_ELEMENTS // max(1, P2))
    for s in range(0, where[0].numel(), step):
        b, i = where[0][s : s + step], where[1][s : s + step]
        exact = pair_dists(p1[b, i][:, None, :], p2[b], norm)
        exact = exact.masked_fill(positions[None] >= lengths2[b, None], float("inf"))
        ids = positions.expand_as(exact)
        idx[b, i, :kk] = sort_by_dist_then_index(exact, ids)[1][:, :kk]


def selection_path(p1: Tensor, p2: Tensor) -> tuple[str, str]:
    """``(path, reason)``: ``"kdtree"`` or ``"brute"`` for neighbour selection on these inputs."""
    why = _kdtree.unavailable(p1.device, p1.dtype)
    if why is not None:
        return "brute", why
    if not _kdtree.worthwhile(p1, p2):
        return "brute", (
            f"P1={p1.shape[1]}, P2={p2.shape[1]}, D={p1.shape[2]}: the kd-tree serves point "
            f"clouds (D <= 3) with P1 >= {_kdtree.MIN_QUERIES}, P2 >= {_kdtree.MIN_POINTS}, "
            f"P1·P2 >= {_kdtree.MIN_PAIRS} and finite coordinates; brute force is faster "
            "or required here"
        )
    return "kdtree", "CPU float32/float64 clouds: kd-tree candidates, exact re-check"


def knn_points(
    p1: Tensor,
    p2: Tensor,
    lengths1: Tensor,
    lengths2: Tensor,
    norm: int,
    K: int,
    return_sorted: bool,
) -> tuple[Tensor, Tensor]:
    """Native ``knn_points`` core: ``(dists [N, P1, K], idx [N, P1, K])``; see :func:`ev_points.ops.knn_points`.

    Always returns the neighbours in ascending order (``return_sorted=False`` allows any order).
    """
    del return_sorted
    if selection_path(p1, p2)[0] == "kdtree":
        idx = _kdtree.knn_idx(p1, p2, lengths1, lengths2, norm, K, CHUNK_ELEMENTS)
    else:
        idx = _knn_idx(p1, p2, lengths1, lengths2, norm, K)
    return knn_dists(p1, p2, lengths1, lengths2, idx, norm), idx


def knn_dists(
    p1: Tensor, p2: Tensor, lengths1: Tensor, lengths2: Tensor, idx: Tensor, norm: int
) -> Tensor:
    """Differentiable k-NN distances ``[N, P1, K]`` of the selected ``idx``, 0 where padded."""
    n, P1, K = idx.shape
    d = p2.shape[2]
    nn = p2.gather(1, idx.reshape(n, -1, 1).expand(-1, -1, d)).reshape(n, P1, K, d)
    dists = pair_dists(p1[:, :, None], nn, norm)
    pad = torch.arange(K, device=p1.device)[None, None, :] >= lengths2[:, None, None]
    pad = pad | (torch.arange(P1, device=p1.device)[None, :, None] >= lengths1[:, None, None])
    return dists.masked_fill(pad, 0.0)


@torch.no_grad()
def _ball_idx(
    p1: Tensor, p2: Tensor, lengths1: Tensor, lengths2: Tensor, K: int, radius: float
) -> Tensor:
    """First K indices (in index order) of valid p2 points with ``dist² < radius²``; -1 padded."""
    n, P1, D = p1.shape
    P2 = p2.shape[1]
    idx = torch.full((n, P1, K), -1, dtype=torch.int64, device=p1.device)
    if K == 0 or P1 == 0 or P2 == 0:
        return idx
    work = torch.float32 if p1.dtype in (torch.float16, torch.bfloat16) else p1.dtype
    q_all, p = _centered(p1.to(work), p2.to(work), lengths2)
    r2 = torch.tensor(radius, dtype=p1.dtype).square()
    # candidates within a slightly larger ball by the matmul form (it loses ~eps·scale), then
    # the exact test in the inputs' dtype (which passes points up to rel·r² beyond the radius)
    scale = float((p * p).sum(-1).max()) + float((q_all * q_all).sum(-1).max())
    rel, tiny = error_bounds(p1.dtype, D)
    loose = (float(r2) + tiny) / (1.0 - rel) * (1 + 1e-4) + 1e-5 * scale
    invalid = torch.arange(P2, device=p1.device)[None, None, :] >= lengths2[:, None, None]
    p_aug = _augment(p)
    ragged = bool((lengths2 < P2).any())
    exact_float = torch.float32 if P2 < (1 << 24) else torch.float64
    positions = torch.arange(P2, dtype=exact_float, device=p1.device)
    kc = min(K + _SLACK, P2)
    step = _row_chunks(n, P1, P2)
    for s in range(0, P1, step):
        q = q_all[:, s : s + step]
        approx = _approx_dists(q, p, p_aug, 2)
        # distinct keys (a member's position, else position + P2): topk degrades on ties
        member = approx < (loose - (q * q).sum(-1, keepdim=True))
        if ragged:
            member &= ~invalid
        key = torch.where(member, positions, positions + P2)
        first = key.topk(kc, dim=2, largest=False, sorted=True)
        cand = first.indices
        found = first.values < P2
        nn = p2.gather(1, cand.reshape(n, -1, 1).expand(-1, -1, D)).reshape(*cand.shape, D)
        inside = (pair_dists(p1[:, s : s + step, None], nn, 2) < r2) & found
        # rows whose K-th member might lie beyond the kc loose candidates: redo them exactly
        short = (inside.sum(-1) < K) & found[..., -1]
        rank = inside.cumsum(-1)
        keep = inside & (rank <= K)
        out = torch.full_like(cand, -1)
        out = torch.where(keep, cand, out)
        # compact kept entries to the front, preserving index order
        order = torch.sort((~keep).to(torch.int8), dim=-1, stable=True).indices
        block = out.gather(-1, order)[..., :K]
        if block.shape[-1] < K:
            block = torch.cat(
                [block, block.new_full((*block.shape[:-1], K - block.shape[-1]), -1)], -1
            )
        if bool(short.any()):
            b, r = short.nonzero(as_tuple=True)
            ok = (pair_dists(p1[b, r + s][:, None, :], p2[b], 2) < r2) & ~invalid[b, 0]
            key2 = torch.where(ok, positions, positions + P2)
            vals, ids = key2.topk(min(K, P2), dim=1, largest=False, sorted=True)
            ids = torch.where(vals < P2, ids, -1)
            fixed = torch.full((ids.shape[0], K), -1, dtype=torch.int64, device=p1.device)
            fixed[:, : ids.shape[1]] = ids
            block[b, r] = fixed
        idx[:, s : s + step] = block
    rows = torch.arange(P1, device=p1.device)[None, :, None] >= lengths1[:, None, None]
    return idx.masked_fill_(rows, -1)


def ball_query(
    p1: Tensor, p2: Tensor, lengths1: Tensor, lengths2: Tensor, K: int, radius: float
) -> tuple[Tensor, Tensor]:
    """Native ``ball_query`` core: ``(dists, idx)``; see :func:`ev_points.ops.ball_query`."""
    if selection_path(p1, p2)[0] == "kdtree":
        idx = _kdtree.ball_query_idx(p1, p2, lengths1, lengths2, K, radius, CHUNK_ELEMENTS)
    else:
        idx = _ball_idx(p1, p2, lengths1, lengths2, K, radius)
    return ball_dists(p1, p2, idx), idx


def ball_dists(p1: Tensor, p2: Tensor, idx: Tensor) -> Tensor:
    """Differentiable squared distances ``[N, P1, K]`` of ball-query ``idx``, 0 where -1."""
    n, P1, K = idx.shape
    d = p2.shape[2]
    nn = p2.gather(1, idx.clamp_min(0).reshape(n, -1, 1).expand(-1, -1, d)).reshape(n, P1, K, d)
    return pair_dists(p1[:, :, None], nn, 2).masked_fill(idx < 0, 0.0)


@torch.no_grad()
def sample_farthest_points(points: Tensor, lengths: Tensor, K: Tensor, start: Tensor) -> Tensor:
    """Native farthest-point sampling: ``idx [N, max(K)]`` padded with -1.

    All clouds advance together, one vectorised step per sample; the squared distances are
    computed per coordinate in float32 in pytorch3d's order, ties go to the lowest index.
    """
    n, P, D = points.shape
    max_k = int(K.max()) if K.numel() else 0
    idx = torch.full((n, max_k), -1, dtype=torch.int64, device=points.device)
    if max_k == 0 or n == 0:
        return idx
    k_n = torch.minimum(K, lengths)
    dev = points.device
    pts = points.detach().to(torch.float32)
    coords = pts.permute(2, 0, 1).contiguous()  # [D, N, P]
    flat = pts.reshape(n * P, D)
    offset = torch.arange(n, device=dev) * P
    min_d = torch.full((n, P), float("inf"), dtype=torch.float32, device=dev)
    min_d.masked_fill_(torch.arange(P, device=dev)[None] >= lengths[:, None], -1.0)
    sel = start.clone()
    chosen_ids = [sel]
    steps = int(k_n.max())
    diff = torch.empty(D, n, P, dtype=torch.float32, device=dev)
    d = torch.empty(n, P, dtype=torch.float32, device=dev)
    for _ in range(1, steps):
        chosen = flat.index_select(0, sel + offset)  # [N, D]
        torch.sub(coords, chosen.t()[:, :, None], out=diff)
        diff.mul_(diff)
        torch.sum(diff, 0, out=d)  # (dx² + dy²) + dz², accumulated in coordinate order
        torch.minimum(min_d, d, out=min_d)
        sel = min_d.argmax(1)
        chosen_ids.append(sel)
    idx[:, :steps] = torch.stack(chosen_ids, 1)
    pos = torch.arange(max_k, device=points.device)[None]
    return idx.masked_fill_(pos >= k_n[:, None], -1)
