"""CMC, mAP and mINP under the Market-1501 protocol (and CUHK03 single-gallery-shot CMC).

Protocol (SYSTEMS.md §3.3), per query:

1. rank the gallery by ascending distance; equal distances are ordered by gallery index
   (what a stable sort of the row gives);
2. remove the gallery entries with the query's person id *and* camera id;
3. skip the query if no entry with its person id remains (it is counted as invalid);
4. CMC(k) = 1 if the first true match is within the first k remaining entries;
5. AP = Σ_k precision@k · rel_k / n_rel (non-interpolated); INP = n_rel / rank of the last
   true match. mAP, mINP and the CMC are averaged over the valid queries.

Nothing here sorts a full gallery row or loops over queries in Python (except the CUHK03
single-shot CMC): for each chunk of queries the true matches are looked up through a
person-id index of the gallery, and the rank of a true match is counted as the number of
gallery entries ranked before it — only entries closer than the query's farthest true match
are ever sorted. With :func:`evaluate_features` the distances themselves are computed one
chunk of queries at a time, so memory stays at a few hundred MB for MSMT17 (11,659 × 82,161)
and the metrics are bitwise those of the full distance matrix.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ev_core.distributed import get_logger
from ev_core.progress import progress
from ev_reid.evaluation.distance import (
    Metric,
    default_chunk_size,
    iter_distance_chunks,
    prepare_features,
    round_chunk_size,
)

if TYPE_CHECKING:
    from ev_reid.evaluation.rerank import RerankConfig

__all__ = ["RankResult", "evaluate_features", "evaluate_rank"]

_LOG = get_logger(__name__)
_TIE_BATCH_ENTRIES = 1 << 22
_EXTRACT_ENTRIES = 1 << 21  # candidate entries sorted at a time by _count_before
_SAME_ID_ENTRIES = 1 << 18  # [rows, m] same-id entries handled at a time by _market_chunk


@dataclass(frozen=True, eq=False)
class RankResult:
    """Retrieval metrics of one evaluation.

    Unpacks like fast-reid's return value: ``cmc, mAP, mINP = evaluate_rank(...)``
    (torchreid returns only ``cmc, mAP``). All metrics are fractions in [0, 1].

    Attributes:
        cmc: ``[max_rank]`` float64; ``cmc[k-1]`` = fraction of valid queries whose first true
            match is within the top k (CUHK03 mode: averaged over the gallery samplings).
        mAP: mean average precision over valid queries.
        mINP: mean inverse negative penalty over valid queries.
        num_valid_queries: queries with at least one true match left after the removal.
        num_queries: all queries.
        metric: the distance used (``"cosine"``, ``"euclidean"``, ``"rerank(...)"`` or
            ``"precomputed"``).
        protocol: ``"market"`` or ``"cuhk03"`` (single-gallery-shot CMC).
        query_ap: ``[Q]`` float64 AP per query (NaN for invalid queries).
        query_inp: ``[Q]`` float64 INP per query (NaN for invalid queries).
        query_first_rank: ``[Q]`` int64 1-based rank of the first true match in the full
            (multi-shot) ranked list; 0 for invalid queries.
    """

    cmc: np.ndarray
    mAP: float
    mINP: float
    num_valid_queries: int
    num_queries: int
    metric: str
    protocol: str
    query_ap: np.ndarray
    query_inp: np.ndarray
    query_first_rank: np.ndarray

    def __iter__(self) -> Iterator[Any]:
        """``cmc, mAP, mINP``."""
        return iter((self.cmc, self.mAP, self.mINP))

    def rank(self, k: int) -> float:
        """CMC at rank ``k`` (1-based)."""
        if not 1 <= k <= len(self.cmc):
            raise ValueError(f"rank must be in [1, {len(self.cmc)}], got {k}")
        return float(self.cmc[k - 1])

    def as_dict(self) -> dict[str, Any]:
        """Scalar summary for logs and JSON (R1/R5/R10 where max_rank allows)."""
        out: dict[str, Any] = {"metric": self.metric, "protocol": self.protocol}
        for k in (1, 5, 10):
            if k <= len(self.cmc):
                out[f"rank{k}"] = self.rank(k)
        out.update(
            mAP=self.mAP,
            mINP=self.mINP,
            num_valid_queries=self.num_valid_queries,
            num_queries=self.num_queries,
        )
        return out

    def __repr__(self) -> str:
        d = self.as_dict()
        body = ", ".join(
            f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in d.items()
        )
        return f"RankResult({body})"


def _as_ids(x: Any, name: str, n: int | None = None) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
    if t.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(t.shape)}")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"{name} must hold integers, got {t.dtype}")
    if n is not None and t.numel() != n:
        raise ValueError(f"{name} has {t.numel()} entries, expected {n}")
    return t.to(torch.int64)


class _Gallery:
    """Gallery ids grouped by person id (CSR), on the device of the distances."""

    def __init__(self, pids: torch.Tensor, camids: torch.Tensor, device: torch.device) -> None:
        self.size = pids.numel()
        self.pids = pids.to(device)
        self.camids = camids.to(device)
        self.order = torch.sort(self.pids, stable=True).indices
        uniq, counts = torch.unique_consecutive(self.pids[self.order], return_counts=True)
        self.uniq = uniq
        self.counts = counts
        self.offsets = torch.cumsum(counts, 0) - counts

    def count(self, q_pids: torch.Tensor) -> torch.Tensor:
        """Gallery entries with each query's pid ``[c]`` (0 when the pid is absent)."""
        pos = torch.searchsorted(self.uniq, q_pids).clamp_(max=self.uniq.numel() - 1)
        return torch.where(self.uniq[pos] == q_pids, self.counts[pos], 0)

    def same_pid(self, q_pids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Gallery indices with each query's pid: ``(gidx [c, m], valid [c, m])``."""
        pos = torch.searchsorted(self.uniq, q_pids).clamp_(max=self.uniq.numel() - 1)
        found = self.uniq[pos] == q_pids
        cnt = torch.where(found, self.counts[pos], 0)
        m = int(cnt.max()) if cnt.numel() else 0
        j = torch.arange(max(m, 1), device=q_pids.device)
        valid = j[None] < cnt[:, None]
        flat = (self.offsets[pos][:, None] + j[None]).clamp_(max=self.size - 1)
        gidx = torch.where(valid, self.order[flat], 0)
        return gidx, valid


@dataclass
class _ChunkResult:
    first_rank: torch.Tensor  # [c] int64, 0 if invalid
    ap: torch.Tensor  # [c] float64, nan if invalid
    inp: torch.Tensor  # [c] float64, nan if invalid


def _sort1d(x: torch.Tensor) -> torch.Tensor:
    if x.device.type == "cpu":  # numpy's SIMD sort is several times faster than torch's on CPU
        return torch.from_numpy(np.sort(x.numpy()))
    return torch.sort(x).values


def _pack(rows: torch.Tensor, vals: torch.Tensor) -> torch.Tensor:
    """Order-preserving int64 keys for (row, float32 value) pairs: row first, then value."""
    bits = (vals + 0.0).view(torch.int32).to(torch.int64)  # + 0.0 turns -0.0 into +0.0
    key = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits) + (1 << 31)  # monotone, in [0, 2^32)
    return (rows << 32) | key


def _count_before(
    dist: torch.Tensor, s_max: torch.Tensor, thr: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(#{k: dist[r, k] < thr[r, j]}, #{k: dist[r, k] <= thr[r, j]})``, both ``[c, m]``.

    Only entries ``<= s_max[r]`` (the row's largest threshold that matters) are extracted;
    they are sorted by (row, distance) and each threshold is located in its row's segment.
    Rows are taken in groups of at most :data:`_EXTRACT_ENTRIES` candidates (a single row
    can exceed it), so the temporaries stay a few tens of MiB whatever the distances.
    """
    c = dist.shape[0]
    if dist.device.type == "cpu":
        counts = torch.from_numpy((dist.numpy() <= s_max.numpy()[:, None]).sum(1))
    else:
        counts = (dist <= s_max[:, None]).sum(1)
    if int(counts.sum()) <= _EXTRACT_ENTRIES:
        return _count_before_rows(dist, s_max, thr)
    less = torch.empty(thr.shape, dtype=torch.int64, device=dist.device)
    leq = torch.empty_like(less)
    cum = counts.cpu().cumsum(0)
    start = 0
    while start < c:
        base = int(cum[start - 1]) if start else 0
        stop = int(torch.searchsorted(cum, base + _EXTRACT_ENTRIES, right=True))
        stop = min(max(stop, start + 1), c)
        less[start:stop], leq[start:stop] = _count_before_rows(
            dist[start:stop], s_max[start:stop], thr[start:stop]
        )
        start = stop
    return less, leq


def _count_before_rows(
    dist: torch.Tensor, s_max: torch.Tensor, thr: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_count_before` for one group of rows, all candidates extracted at once."""
    c, g = dist.shape
    m = thr.shape[1]
    if dist.device.type == "cpu":  # numpy's compare + flatnonzero is several times faster here
        flat = torch.from_numpy(np.flatnonzero(dist.numpy() <= s_max.numpy()[:, None]))
    else:
        flat = (dist <= s_max[:, None]).view(-1).nonzero()[:, 0]
    rows = flat // g
    vals = dist.view(-1)[flat]
    start = torch.searchsorted(rows, torch.arange(c + 1, device=dist.device))
    thr_rows = torch.arange(c, device=dist.device)[:, None].expand(c, m).reshape(-1)
    if dist.dtype == torch.float32:
        keys = _sort1d(_pack(rows, vals))
        tk = _pack(thr_rows, thr.reshape(-1))
        less = torch.searchsorted(keys, tk, right=False) - start[thr_rows]
        leq = torch.searchsorted(keys, tk, right=True) - start[thr_rows]
        return less.view(c, m), leq.view(c, m)
    # float64: sort by value, then stably by row; binary search within each row's segment
    perm = torch.sort(vals, stable=True).indices
    perm = perm[torch.sort(rows[perm], stable=True).indices]
    srt = vals[perm]
    t = thr.reshape(-1)
    out = []
    for right in (False, True):
        lo, hi = start[thr_rows].clone(), start[thr_rows + 1].clone()
        for _ in range(max(1, int(flat.numel()).bit_length())):
            active = lo < hi
            mid = (lo + hi) // 2
            v = srt[mid.clamp(max=max(srt.numel() - 1, 0))] if srt.numel() else t
            go = (v <= t) if right else (v < t)
            lo = torch.where(active & go, mid + 1, lo)
            hi = torch.where(active & ~go, mid, hi)
        out.append((lo - start[thr_rows]).view(c, m))
    return out[0], out[1]


def _market_chunk(
    dist: torch.Tensor, q_pids: torch.Tensor, q_camids: torch.Tensor, gal: _Gallery
) -> _ChunkResult:
    """Per-query AP/INP/first-match rank for ``dist: [c, G]`` (see :func:`_market_rows`).

    The same-id bookkeeping is ``[rows, m]`` per group of rows (``m`` = the largest number of
    gallery images of one of their identities); rows are grouped so that it never exceeds
    :data:`_SAME_ID_ENTRIES` entries (one row at a time when a single identity is larger), so
    memory does not grow with ``m``.
    """
    c = dist.shape[0]
    counts = gal.count(q_pids).clamp_(min=1).cpu()
    parts: list[_ChunkResult] = []
    start = 0
    while start < c:
        stop = start + 1
        widest = int(counts[start])
        while stop < c:
            wider = max(widest, int(counts[stop]))
            if wider * (stop + 1 - start) > _SAME_ID_ENTRIES:
                break
            widest, stop = wider, stop + 1
        parts.append(_market_rows(dist[start:stop], q_pids[start:stop], q_camids[start:stop], gal))
        start = stop
    if len(parts) == 1:
        return parts[0]
    return _ChunkResult(
        first_rank=torch.cat([p.first_rank for p in parts]),
        ap=torch.cat([p.ap for p in parts]),
        inp=torch.cat([p.inp for p in parts]),
    )


def _market_rows(
    dist: torch.Tensor, q_pids: torch.Tensor, q_camids: torch.Tensor, gal: _Gallery
) -> _ChunkResult:
    """Per-query AP/INP/first-match rank for ``dist: [c, G]`` (see the module docstring).

    For the true match ``j`` of a query, ``rank_j = 1 + #{entries before j}`` where "before"
    is lexicographic on (distance, gallery index), minus the removed same-camera entries
    before ``j``. Entries before a true match are no farther than the farthest true match, so
    only those candidates are extracted, sorted, and searched for the true-match distances.
    """
    dev = dist.device
    gidx, valid = gal.same_pid(q_pids)  # [c, m] same-id gallery entries, ascending index
    m = gidx.shape[1]
    cams = gal.camids[gidx]
    rel = valid & (cams != q_camids[:, None])  # true matches
    rem = valid & (cams == q_camids[:, None])  # same id and camera: removed
    n_rel = rel.sum(1)
    dp = dist.gather(1, gidx)
    inf = torch.tensor(float("inf"), dtype=dist.dtype, device=dev)

    # same-id entries sorted by (distance, gallery index): gidx ascends along each row and the
    # padding sits at the end, so a stable sort by distance gives exactly that order
    perm = torch.sort(torch.where(valid, dp, inf), dim=1, stable=True).indices
    rel_s = rel.gather(1, perm)
    # R: removed entries (same id and camera) before each position, from one cumulative sum
    rem_s = rem.gather(1, perm).to(torch.int64)
    rem_before_s = rem_s.cumsum(1) - rem_s
    # true matches first (in that order), the rest after them
    compact = torch.sort((~rel_s).to(torch.uint8), dim=1, stable=True).indices
    order = perm.gather(1, compact)
    thr = torch.where(rel, dp, inf).gather(1, order)  # [c, m]
    thr_idx = gidx.gather(1, order)
    rem_before = rem_before_s.gather(1, compact)

    # L: entries strictly closer than each true match; only entries no farther than the
    # farthest true match can be, so only those are sorted
    s_max = torch.where(rel, dp, -inf).amax(1)
    less, leq = _count_before(dist, s_max, thr)
    before = less

    # E: entries at exactly the distance of a true match with a lower gallery index (rare)
    tr, tj = (rel.gather(1, order) & (leq - less > 1)).nonzero(as_tuple=True)
    if tr.numel():
        cols = torch.arange(dist.shape[1], device=dev)
        step = max(1, _TIE_BATCH_ENTRIES // dist.shape[1])
        for s in range(0, tr.numel(), step):
            r, j = tr[s : s + step], tj[s : s + step]
            hit = (dist[r] == thr[r, j][:, None]) & (cols[None] < thr_idx[r, j][:, None])
            before[r, j] += hit.sum(1)

    before -= rem_before

    rank = before + 1  # ascending along each row for the first n_rel positions
    is_valid = n_rel > 0
    j = torch.arange(m, device=dev)
    hits = (j + 1).to(torch.float64)
    prec = torch.where(j[None] < n_rel[:, None], hits[None] / rank.to(torch.float64), 0.0)
    last = (n_rel - 1).clamp(min=0)[:, None]
    nan = torch.tensor(float("nan"), dtype=torch.float64, device=dev)
    n_rel_f = n_rel.to(torch.float64)
    # cumsum adds sequentially along the row, so the sum does not depend on the padding width
    ap = torch.where(is_valid, prec.cumsum(1).gather(1, last)[:, 0] / n_rel_f, nan)
    inp = torch.where(is_valid, n_rel_f / rank.gather(1, last)[:, 0].to(torch.float64), nan)
    first = torch.where(is_valid, rank[:, 0], 0)
    return _ChunkResult(first_rank=first, ap=ap, inp=inp)


def _cuhk03_cmc(
    dist: np.ndarray,
    q_pids: np.ndarray,
    q_camids: np.ndarray,
    g_pids: np.ndarray,
    g_camids: np.ndarray,
    max_rank: int,
    num_repeats: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """Single-gallery-shot CMC per query ``[c, max_rank]`` (zeros for invalid queries)."""
    out = np.zeros((dist.shape[0], max_rank))
    for i in range(dist.shape[0]):
        order = np.argsort(dist[i], kind="stable")
        gp, gc = g_pids[order], g_camids[order]
        keep = ~((gp == q_pids[i]) & (gc == q_camids[i]))
        gp = gp[keep]
        if not (gp == q_pids[i]).any():
            continue
        for _ in range(num_repeats):
            # one uniformly drawn image per gallery identity: the smallest random key wins
            grouped = np.lexsort((rng.random(gp.size), gp))
            first_of_id = np.ones(gp.size, dtype=bool)
            first_of_id[1:] = gp[grouped[1:]] != gp[grouped[:-1]]
            chosen = np.sort(grouped[first_of_id])  # positions in the ranked list
            r = int(np.flatnonzero(gp[chosen] == q_pids[i])[0])  # 0-based single-shot rank
            out[i, r:] += 1.0
    return out / num_repeats


def _evaluate_chunks(
    chunks: Iterator[tuple[int, torch.Tensor]],
    q_pids: torch.Tensor,
    g_pids: torch.Tensor,
    q_camids: torch.Tensor,
    g_camids: torch.Tensor,
    *,
    max_rank: int,
    use_metric_cuhk03: bool,
    num_repeats: int,
    seed: int,
    metric: str,
    show_progress: bool,
) -> RankResult:
    if max_rank < 1:
        raise ValueError(f"max_rank must be >= 1, got {max_rank}")
    if num_repeats < 1:
        raise ValueError(f"num_repeats must be >= 1, got {num_repeats}")
    nq, ng = q_pids.numel(), g_pids.numel()
    if nq == 0 or ng == 0:
        raise ValueError(f"need at least one query and one gallery entry, got {nq} and {ng}")
    first = np.zeros(nq, dtype=np.int64)
    ap = np.full(nq, np.nan)
    inp = np.full(nq, np.nan)
    cmc_sum = np.zeros(max_rank)
    rng = np.random.default_rng(seed)
    gal: _Gallery | None = None
    g_pids_np, g_camids_np = g_pids.numpy(), g_camids.numpy()
    bar = progress(total=nq, desc=f"evaluate ({metric})") if show_progress else None
    try:
        for start, dist in chunks:
            if dist.ndim != 2 or dist.shape[1] != ng:
                raise ValueError(
                    f"distance chunk has shape {tuple(dist.shape)}, expected [*, {ng}]"
                )
            if torch.isnan(dist.sum()) and torch.isnan(dist).any():  # cheap test first
                raise ValueError("distance matrix contains NaN")
            dist = dist.detach().contiguous()
            if not dist.is_floating_point():
                dist = dist.to(torch.float64)
            elif dist.dtype not in (torch.float32, torch.float64):
                dist = dist.float()
            stop = start + dist.shape[0]
            if gal is None:
                gal = _Gallery(g_pids, g_camids, dist.device)
            qp, qc = q_pids[start:stop], q_camids[start:stop]
            res = _market_chunk(dist, qp.to(dist.device), qc.to(dist.device), gal)
            first[start:stop] = res.first_rank.cpu().numpy()
            ap[start:stop] = res.ap.cpu().numpy()
            inp[start:stop] = res.inp.cpu().numpy()
            if use_metric_cuhk03:
                d = dist.cpu().numpy()
                cmc_sum += _cuhk03_cmc(
                    d, qp.numpy(), qc.numpy(), g_pids_np, g_camids_np, max_rank, num_repeats, rng
                ).sum(0)
            if bar is not None:
                bar.update(dist.shape[0])
    finally:
        if bar is not None:
            bar.close()
    valid = first > 0
    num_valid = int(valid.sum())
    if num_valid == 0:
        raise ValueError("no query has a true match in the gallery (after same-camera removal)")
    if use_metric_cuhk03:
        cmc = cmc_sum / num_valid
    else:
        counts = np.bincount(np.minimum(first[valid], max_rank + 1) - 1, minlength=max_rank + 1)
        cmc = np.cumsum(counts[:max_rank]) / num_valid
    result = RankResult(
        cmc=cmc,
        mAP=float(np.mean(ap[valid])),
        mINP=float(np.mean(inp[valid])),
        num_valid_queries=num_valid,
        num_queries=nq,
        metric=metric,
        protocol="cuhk03" if use_metric_cuhk03 else "market",
        query_ap=ap,
        query_inp=inp,
        query_first_rank=first,
    )
    if num_valid < nq:
        _LOG.info("%d of %d queries have no true match and were skipped", nq - num_valid, nq)
    return result


def evaluate_rank(
    distmat: torch.Tensor | np.ndarray,
    q_pids: torch.Tensor | np.ndarray | Sequence[int],
    g_pids: torch.Tensor | np.ndarray | Sequence[int],
    q_camids: torch.Tensor | np.ndarray | Sequence[int],
    g_camids: torch.Tensor | np.ndarray | Sequence[int],
    max_rank: int = 50,
    use_metric_cuhk03: bool = False,
    *,
    num_repeats: int = 10,
    seed: int = 0,
    chunk_size: int | None = None,
    show_progress: bool = False,
) -> RankResult:
    """CMC/mAP/mINP from a query × gallery distance matrix (torchreid/fast-reid argument order).

    The Market-1501 protocol is described in the module docstring. With
    ``use_metric_cuhk03=True`` the CMC is the classic CUHK03 *single-gallery-shot* CMC: for
    each valid query, one image per gallery identity is drawn uniformly (after the same-camera
    removal), the CMC of that reduced list is computed, and this is repeated ``num_repeats``
    times and averaged (as torchreid does). AP, mINP and ``query_first_rank`` still use the
    full list (as torchreid's AP does). Draws come from ``numpy.random.default_rng(seed)``,
    consumed in query order, so results are reproducible and independent of ``chunk_size``.

    Unlike torchreid, ``max_rank`` is not shortened when the gallery is smaller: CMC(k) for k
    beyond the ranked list keeps its last value.

    Args:
        distmat: ``[Q, G]`` distances (numpy or torch, any device; smaller = more similar).
        q_pids: ``[Q]`` query person ids.
        g_pids: ``[G]`` gallery person ids (distractors, e.g. Market's pid 0, are fine).
        q_camids: ``[Q]`` query camera ids.
        g_camids: ``[G]`` gallery camera ids.
        max_rank: length of the returned CMC.
        use_metric_cuhk03: single-gallery-shot CMC (CUHK03 classic splits only).
        num_repeats: samplings averaged by the CUHK03 metric.
        seed: seed of the CUHK03 samplings.
        chunk_size: query rows processed at a time (memory of the temporaries).
        show_progress: show a progress bar.

    Returns:
        A :class:`RankResult` (unpacks as ``cmc, mAP, mINP``).

    Raises:
        ValueError: on mismatched shapes, NaN distances, or when no query has a true match.
    """
    dist = torch.as_tensor(distmat) if not isinstance(distmat, torch.Tensor) else distmat
    if dist.ndim != 2:
        raise ValueError(f"distmat must be 2-D [Q, G], got shape {tuple(dist.shape)}")
    nq, ng = dist.shape
    qp = _as_ids(q_pids, "q_pids", nq)
    gp = _as_ids(g_pids, "g_pids", ng)
    qc = _as_ids(q_camids, "q_camids", nq)
    gc = _as_ids(g_camids, "g_camids", ng)
    c = default_chunk_size(ng) if chunk_size is None else round_chunk_size(chunk_size)
    chunks = ((s, dist[s : s + c]) for s in range(0, nq, c))
    return _evaluate_chunks(
        chunks,
        qp,
        gp,
        qc,
        gc,
        max_rank=max_rank,
        use_metric_cuhk03=use_metric_cuhk03,
        num_repeats=num_repeats,
        seed=seed,
        metric="precomputed",
        show_progress=show_progress,
    )


def evaluate_features(
    qf: torch.Tensor,
    gf: torch.Tensor,
    q_pids: torch.Tensor | np.ndarray | Sequence[int],
    g_pids: torch.Tensor | np.ndarray | Sequence[int],
    q_camids: torch.Tensor | np.ndarray | Sequence[int],
    g_camids: torch.Tensor | np.ndarray | Sequence[int],
    *,
    metric: Metric | str = Metric.COSINE,
    max_rank: int = 50,
    chunk_size: int | None = None,
    device: torch.device | str | None = None,
    use_metric_cuhk03: bool = False,
    rerank: bool | RerankConfig = False,
    num_repeats: int = 10,
    seed: int = 0,
    show_progress: bool = True,
) -> RankResult:
    """Evaluate from features without ever holding the full distance matrix.

    Query chunks of ``chunk_size`` rows (rounded up to a multiple of
    :data:`~ev_reid.evaluation.distance.ROW_BLOCK`) are compared with the whole gallery, scored,
    and dropped: beyond the features, memory is one ``[chunk, G]`` distance block plus the
    entries closer than each query's farthest true match; the metrics are bitwise equal to
    ``evaluate_rank(pairwise_distance(qf, gf), ...)``.

    Args:
        qf: ``[Q, D]`` query features.
        gf: ``[G, D]`` gallery features.
        q_pids, g_pids, q_camids, g_camids: ids as in :func:`evaluate_rank`.
        metric: ``"cosine"`` (``1 - cos``) or ``"euclidean"`` (squared L2).
        max_rank: length of the CMC.
        chunk_size: queries per chunk (default: about 16M distances per chunk).
        device: where distances are computed (default: the features' device; CUDA works).
        use_metric_cuhk03: CUHK03 single-gallery-shot CMC, see :func:`evaluate_rank`.
        rerank: ``True`` or a :class:`~ev_reid.evaluation.rerank.RerankConfig` to rank by
            memory-bounded k-reciprocal re-ranking distances instead.
        num_repeats: CUHK03 samplings.
        seed: CUHK03 sampling seed.
        show_progress: progress bar (also silenced by ``EV_QUIET``).

    Returns:
        A :class:`RankResult` whose ``metric`` names the distance used.
    """
    nq, ng = qf.shape[0], gf.shape[0]
    qp = _as_ids(q_pids, "q_pids", nq)
    gp = _as_ids(g_pids, "g_pids", ng)
    qc = _as_ids(q_camids, "q_camids", nq)
    gc = _as_ids(g_camids, "g_camids", ng)
    m = Metric(metric)
    dev = torch.device(device) if device is not None else qf.device
    q = prepare_features(qf.to(dev), m)
    g = prepare_features(gf.to(dev), m)
    chunks: Iterator[tuple[int, torch.Tensor]]
    if rerank:
        from ev_reid.evaluation.rerank import RerankConfig, rerank_chunks

        cfg = rerank if isinstance(rerank, RerankConfig) else RerankConfig()
        chunks = rerank_chunks(q, g, metric=m, config=cfg, chunk_size=chunk_size)
        name = (
            f"rerank({m.value}, k1={cfg.k1}, k2={cfg.k2}, lambda={cfg.lambda_value}, "
            f"on={cfg.convention.value})"
        )
    else:
        chunks = iter_distance_chunks(q, g, m, chunk_size)
        name = m.value
    _LOG.info("evaluating %d queries x %d gallery with distance %s", nq, ng, name)
    return _evaluate_chunks(
        chunks,
        qp,
        gp,
        qc,
        gc,
        max_rank=max_rank,
        use_metric_cuhk03=use_metric_cuhk03,
        num_repeats=num_repeats,
        seed=seed,
        metric=name,
        show_progress=show_progress,
    )
