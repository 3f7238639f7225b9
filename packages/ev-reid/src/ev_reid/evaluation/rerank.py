"""Memory-bounded k-reciprocal re-ranking (Zhong et al., CVPR'17) and average query expansion.

The standard implementation (the authors' code, torchreid, fast-reid's ``re_ranking``) builds
dense ``(Q+G)²`` matrices — 35 GB in fp32 for MSMT17. Here every dense object is replaced by
its sparse counterpart; only one chunk of rows of distances exists at a time:

1. chunked distances over all ``N = Q+G`` features give each row's ``k1+1`` nearest
   neighbours (ties by index) and its largest distance (torch, or faiss via
   :class:`KnnBackend`);
2. k-reciprocal sets ``R(i, k1)`` and ``R(i, round(k1/2))`` from the neighbour lists; the
   expansion adds ``R(c, k1/2)`` of a member ``c`` when more than 2/3 of it lies in ``R(i, k1)``;
3. ``V[i, j] = exp(-o(i, j)) / Σ exp(-o(i, ·))`` over the expanded set, stored as a sparse CSR
   matrix, with ``o`` the row-normalised distance of the chosen :class:`RerankConvention`;
4. local query expansion: ``V ← mean of V over the k2 nearest neighbours`` (sparse product);
5. Jaccard distance ``1 - m/(2-m)`` with ``m(i, j) = Σ_k min(V[i,k], V[j,k])`` from the sparse
   rows and columns of ``V``; final distance ``(1-λ)·Jaccard + λ·o``.

``d`` is the evaluation distance (:class:`~ev_reid.evaluation.distance.Metric`: ``1-cos`` or
squared L2). Two conventions for ``o`` exist in the wild (:class:`RerankConvention`):

- ``FEATURES`` (default), the original re-ranking run on features (Zhong et al.'s code and
  reid-strong-baseline's ``re_ranking(probFea, galFea, ...)``): ``o(i, j) = d(i, j) /
  max_j' d(i, j')`` with ``d`` the squared Euclidean distance of the features (for cosine, the
  features are L2-normalised, where ``‖a-b‖² = 2(1-cos)``, so ``o`` is the same ratio);
- ``DISTANCES``, the Python ``re_ranking(q_g_dist, q_q_dist, g_g_dist)`` that torchreid ships:
  it squares the distances it is given, ``o = d² / max d²``; torchreid passes squared Euclidean
  distances, so its ``o`` is ``‖a-b‖⁴`` normalised.

The original stores ``V`` in float16; here everything is float64. Memory is
``O(N·(k1 + |R*|·k2))`` plus one chunk of ``chunk × N`` distances; no GPU is needed.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from ev_reid.evaluation.distance import (
    Metric,
    default_chunk_size,
    iter_distance_chunks,
    prepare_features,
    topk_smallest,
)

__all__ = [
    "KnnBackend",
    "RerankConfig",
    "RerankConvention",
    "average_query_expansion",
    "k_reciprocal_rerank",
    "k_reciprocal_rerank_topk",
    "rerank_chunks",
]


class KnnBackend(str, Enum):  # noqa: UP042 (StrEnum needs Python 3.11)
    """Nearest-neighbour search used by re-ranking.

    ``TORCH`` (default): chunked matrix products and a tie-stable top-k on the features'
    device. ``FAISS``: exact faiss flat indexes on CPU (``pip install ev-reid[faiss]``); faiss
    orders equal distances by its own rule, so results can differ from ``TORCH`` on exact ties.
    """

    TORCH = "torch"
    FAISS = "faiss"


class RerankConvention(str, Enum):  # noqa: UP042 (StrEnum needs Python 3.11)
    """How the base distance enters re-ranking (see the module docstring).

    ``FEATURES``: the original algorithm on features, ``o = d / max d`` with ``d`` the squared
    Euclidean (or ``1 - cos``) distance. ``DISTANCES``: torchreid's ``re_ranking`` on given
    distances, which squares them: ``o = d² / max d²``.
    """

    FEATURES = "features"
    DISTANCES = "distances"


def _normalised(d: np.ndarray, dmax: np.ndarray, convention: RerankConvention) -> np.ndarray:
    """Row-normalised distance ``o`` for re-ranking (``dmax`` broadcast against ``d``)."""
    ratio = d / dmax
    return ratio * ratio if convention is RerankConvention.DISTANCES else ratio


@dataclass(frozen=True)
class RerankConfig:
    """k-reciprocal re-ranking parameters (defaults from the paper: k1 20, k2 6, λ 0.3).

    Attributes:
        k1: size of the k-reciprocal neighbourhood.
        k2: neighbours averaged by the local query expansion (1 disables it).
        lambda_value: weight of the original distance in the final distance.
        convention: ``"features"`` (the original on features, default) or ``"distances"``
            (torchreid's convention of squaring given distances), see
            :class:`RerankConvention`.
        backend: nearest-neighbour backend.
        chunk_size: rows per distance chunk (default: about 16M distances per chunk).
    """

    k1: int = 20
    k2: int = 6
    lambda_value: float = 0.3
    convention: RerankConvention = RerankConvention.FEATURES
    backend: KnnBackend = KnnBackend.TORCH
    chunk_size: int | None = None

    def __post_init__(self) -> None:
        if self.k1 < 1 or self.k2 < 1:
            raise ValueError(f"k1 and k2 must be >= 1, got k1={self.k1}, k2={self.k2}")
        if self.k2 > self.k1 + 1:
            raise ValueError(f"k2 ({self.k2}) cannot exceed k1 + 1 ({self.k1 + 1})")
        if not 0.0 <= self.lambda_value <= 1.0:
            raise ValueError(f"lambda_value must be in [0, 1], got {self.lambda_value}")
        object.__setattr__(self, "backend", KnnBackend(self.backend))
        object.__setattr__(self, "convention", RerankConvention(self.convention))


def _import_faiss() -> Any:
    try:
        return importlib.import_module("faiss")
    except ImportError as err:
        raise ImportError(
            "the faiss re-ranking backend needs faiss: pip install ev-reid[faiss]"
        ) from err


def _knn_torch(
    x: torch.Tensor, metric: Metric, k: int, chunk_size: int | None
) -> tuple[np.ndarray, np.ndarray]:
    knn = np.empty((x.shape[0], k), dtype=np.int64)
    dmax = np.empty(x.shape[0], dtype=np.float64)
    for start, d in iter_distance_chunks(x, x, metric, chunk_size):
        stop = start + d.shape[0]
        knn[start:stop] = topk_smallest(d, k)[1].cpu().numpy()
        dmax[start:stop] = d.amax(1).double().cpu().numpy()
    return knn, dmax


def _knn_faiss(x: torch.Tensor, metric: Metric, k: int) -> tuple[np.ndarray, np.ndarray]:
    faiss = _import_faiss()
    xs = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
    if metric is Metric.COSINE:
        index = faiss.IndexFlatIP(xs.shape[1])
        index.add(xs)
        _, knn = index.search(xs, k)
        far_sim, _ = index.search(np.ascontiguousarray(-xs), 1)  # max of -x·y = -min x·y
        dmax = 1.0 + far_sim[:, 0].astype(np.float64)
    else:
        index = faiss.IndexFlatL2(xs.shape[1])
        index.add(xs)
        _, knn = index.search(xs, k)
        # farthest point: max_j |x_j|² - 2 x·x_j, an inner product of augmented vectors
        sq = (xs.astype(np.float64) ** 2).sum(1)
        aug = faiss.IndexFlatIP(xs.shape[1] + 1)
        aug.add(np.ascontiguousarray(np.hstack([xs, sq[:, None].astype(np.float32)])))
        queries = np.hstack([-2.0 * xs, np.ones((xs.shape[0], 1), np.float32)])
        best, _ = aug.search(np.ascontiguousarray(queries, dtype=np.float32), 1)
        dmax = np.maximum(sq + best[:, 0], 0.0)
    return knn.astype(np.int64), dmax


def _reciprocal(knn: np.ndarray) -> np.ndarray:
    """``mask[i, a]``: is ``i`` among the neighbours of its ``a``-th neighbour? ``[N, K]``."""
    n, k = knn.shape
    out = np.empty((n, k), dtype=bool)
    step = max(1, (1 << 22) // (k * k))
    for s in range(0, n, step):
        rows = np.arange(s, min(s + step, n))
        out[rows] = (knn[knn[rows]] == rows[:, None, None]).any(2)
    return out


def _pair_distance(x: torch.Tensor, i: np.ndarray, j: np.ndarray, metric: Metric) -> np.ndarray:
    """Distances between rows ``x[i]`` and ``x[j]`` (element-wise pairs), float64."""
    xi = x[torch.from_numpy(i).to(x.device)].double()
    xj = x[torch.from_numpy(j).to(x.device)].double()
    dot = (xi * xj).sum(1)
    if metric is Metric.COSINE:
        d = 1.0 - dot
    else:
        d = (xi * xi).sum(1) + (xj * xj).sum(1) - 2.0 * dot
    return d.clamp(min=0.0).cpu().numpy()


def _expanded_sets(knn: np.ndarray, k1: int) -> tuple[np.ndarray, np.ndarray]:
    """Expanded k-reciprocal sets ``R*(i)`` as CSR ``(indptr, indices)``."""
    n = knn.shape[0]
    kh = round(k1 / 2) + 1  # round half to even, like numpy's around in the original code
    rec = _reciprocal(knn)
    knn_h = knn[:, :kh]
    rec_h = _reciprocal(knn_h)
    r_full = np.where(rec, knn, -1)  # R(i, k1), padded with -1
    r_half = np.where(rec_h, knn_h, -1)  # R(i, k1/2)
    sizes_h = rec_h.sum(1)
    indptr = np.zeros(n + 1, dtype=np.int64)
    parts: list[np.ndarray] = []
    step = max(1, (1 << 22) // (knn.shape[1] * kh * knn.shape[1]))
    for s in range(0, n, step):
        r = r_full[s : s + step]  # [c, K]
        cand = np.maximum(r, 0)
        s_sets = np.where(r[:, :, None] >= 0, r_half[cand], -1)  # [c, K, kh]
        inter = ((s_sets[..., None] == r[:, None, None, :]) & (s_sets[..., None] >= 0)).any(3)
        size = np.where(r >= 0, sizes_h[cand], 0)
        add = inter.sum(2) > (2.0 / 3.0) * size  # size 0 never adds
        members = np.concatenate([r, np.where(add[:, :, None], s_sets, -1).reshape(len(r), -1)], 1)
        members.sort(1)
        new = np.ones_like(members, dtype=bool)
        new[:, 1:] = members[:, 1:] != members[:, :-1]
        keep = new & (members >= 0)
        indptr[s + 1 : s + 1 + len(r)] = keep.sum(1)
        parts.append(members[keep])
    np.cumsum(indptr, out=indptr)
    return indptr, np.concatenate(parts)


def _sparse_weights(
    x: torch.Tensor, metric: Metric, cfg: RerankConfig
) -> tuple[sp.csr_matrix, np.ndarray]:
    """``(V after local query expansion [N, N] CSR, row max distance [N])``."""
    k = cfg.k1 + 1
    n = x.shape[0]
    if n < k:
        raise ValueError(f"re-ranking with k1={cfg.k1} needs at least {k} features, got {n}")
    if cfg.backend is KnnBackend.FAISS:
        knn, dmax = _knn_faiss(x, metric, k)
    else:
        knn, dmax = _knn_torch(x, metric, k, cfg.chunk_size)
    dmax = np.where(dmax > 0, dmax, 1.0)  # all-identical features: avoid 0/0
    indptr, cols = _expanded_sets(knn, cfg.k1)
    rows = np.repeat(np.arange(n), np.diff(indptr))
    o = _normalised(_pair_distance(x, rows, cols, metric), dmax[rows], cfg.convention)
    w = np.exp(-o)
    w /= np.bincount(rows, weights=w, minlength=n)[rows]
    v = sp.csr_matrix((w, cols, indptr), shape=(n, n))
    if cfg.k2 > 1:  # local query expansion: mean of V over the k2 nearest neighbours
        mean_op = sp.csr_matrix(
            (
                np.full(n * cfg.k2, 1.0 / cfg.k2),
                knn[:, : cfg.k2].ravel(),
                np.arange(0, n * cfg.k2 + 1, cfg.k2),
            ),
            shape=(n, n),
        )
        v = (mean_op @ v).tocsr()
    v.sum_duplicates()
    return v, dmax


def rerank_chunks(
    qf: torch.Tensor,
    gf: torch.Tensor,
    *,
    metric: Metric | str = Metric.COSINE,
    config: RerankConfig | None = None,
    chunk_size: int | None = None,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(start, [c, G] re-ranked distances)`` for consecutive chunks of queries.

    Args:
        qf: ``[Q, D]`` query features.
        gf: ``[G, D]`` gallery features.
        metric: base distance, see :class:`~ev_reid.evaluation.distance.Metric`.
        config: re-ranking parameters.
        chunk_size: queries per yielded chunk (default: about 16M entries per chunk).

    Yields:
        ``(start, dist)``: rows ``start:start+c`` of the ``[Q, G]`` float64 final distance
        ``(1-λ)·Jaccard + λ·o`` on the CPU.
    """
    cfg = config or RerankConfig()
    m = Metric(metric)
    q = prepare_features(qf, m)
    g = prepare_features(gf.to(q.device), m)
    nq, ng = q.shape[0], g.shape[0]
    x = torch.cat([q, g])
    v, dmax = _sparse_weights(x, m, cfg)
    csc = v.tocsc()
    lam = cfg.lambda_value
    # the Jaccard scatter needs chunk × G float64 entries: keep chunks modest
    step = default_chunk_size(ng) if chunk_size is None else chunk_size
    for start, d in iter_distance_chunks(q, g, m, step):
        c = d.shape[0]
        vq = v[start : start + c].tocoo()
        cnt = np.diff(csc.indptr)[vq.col]
        total = int(cnt.sum())
        rep = np.repeat(np.arange(vq.nnz), cnt)
        pos = (
            np.arange(total)
            - np.repeat(np.cumsum(cnt) - cnt, cnt)
            + np.repeat(csc.indptr[vq.col], cnt)
        )
        j = csc.indices[pos]
        in_gallery = j >= nq
        rep, j, vj = rep[in_gallery], j[in_gallery] - nq, csc.data[pos][in_gallery]
        mins = np.minimum(vq.data[rep], vj)
        flat = vq.row[rep].astype(np.int64) * ng + j
        tmin = np.bincount(flat, weights=mins, minlength=c * ng).reshape(c, ng)
        jaccard = 1.0 - tmin / (2.0 - tmin)
        o = _normalised(d.double().cpu().numpy(), dmax[start : start + c, None], cfg.convention)
        yield start, torch.from_numpy((1.0 - lam) * jaccard + lam * o)


def k_reciprocal_rerank(
    qf: torch.Tensor,
    gf: torch.Tensor,
    *,
    metric: Metric | str = Metric.COSINE,
    config: RerankConfig | None = None,
) -> torch.Tensor:
    """Dense ``[Q, G]`` re-ranked distance matrix (for problems where Q × G fits in memory).

    See :func:`rerank_chunks` for the arguments; large problems should use
    :func:`k_reciprocal_rerank_topk` or ``evaluate_features(..., rerank=True)``.
    """
    out = torch.empty((qf.shape[0], gf.shape[0]), dtype=torch.float64)
    for start, d in rerank_chunks(qf, gf, metric=metric, config=config):
        out[start : start + d.shape[0]] = d
    return out


def k_reciprocal_rerank_topk(
    qf: torch.Tensor,
    gf: torch.Tensor,
    k: int,
    *,
    metric: Metric | str = Metric.COSINE,
    config: RerankConfig | None = None,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` best gallery entries per query under re-ranked distances, memory-bounded.

    Returns:
        ``(distances [Q, k] float64, gallery indices [Q, k] int64)``, ascending, ties by index.
    """
    vals = torch.empty((qf.shape[0], k), dtype=torch.float64)
    idx = torch.empty((qf.shape[0], k), dtype=torch.int64)
    for start, d in rerank_chunks(qf, gf, metric=metric, config=config, chunk_size=chunk_size):
        v, i = topk_smallest(d, k)
        vals[start : start + d.shape[0]] = v
        idx[start : start + d.shape[0]] = i
    return vals, idx


def average_query_expansion(
    qf: torch.Tensor,
    gf: torch.Tensor,
    *,
    k: int = 5,
    alpha: float = 3.0,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """α-weighted average query expansion, one round (fast-reid's ``aqe`` semantics).

    Every query and gallery feature is replaced by the mean of its ``k`` nearest neighbours
    among all ``Q+G`` features (itself included; cosine similarity, ties by index), each
    weighted by ``similarity ** alpha``. Computed in chunks of rows: memory ``chunk × (Q+G)``.

    Args:
        qf: ``[Q, D]`` query features.
        gf: ``[G, D]`` gallery features.
        k: neighbours averaged.
        alpha: similarity exponent.
        chunk_size: rows per chunk.

    Returns:
        ``(qf', gf')`` with the input shapes and dtype (not normalised).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    x = torch.cat([qf, gf.to(qf.device)])
    feats = x if x.dtype in (torch.float32, torch.float64) else x.float()
    normed = prepare_features(feats, Metric.COSINE)
    out = torch.empty_like(feats)
    for start, d in iter_distance_chunks(normed, normed, Metric.COSINE, chunk_size):
        dist, idx = topk_smallest(d, min(k, x.shape[0]))
        weights = (1.0 - dist).pow(alpha)  # cosine similarity ** alpha
        out[start : start + d.shape[0]] = (feats[idx] * weights[..., None]).mean(1)
    out = out.to(x.dtype)
    return out[: qf.shape[0]], out[qf.shape[0] :]
