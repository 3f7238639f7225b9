"""Sparse k-reciprocal re-ranking and AQE against dense, literal reference implementations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ev_reid.evaluation import (
    KnnBackend,
    RerankConfig,
    average_query_expansion,
    evaluate_features,
    evaluate_rank,
    k_reciprocal_rerank,
    k_reciprocal_rerank_topk,
    pairwise_distance,
    prepare_features,
)


def dense_k_reciprocal(q_g, q_q, g_g, k1, k2, lam):
    """torchreid's ``re_ranking(q_g_dist, q_q_dist, g_g_dist)``: squares the given distances."""
    dist = np.block([[q_q, q_g], [q_g.T, g_g]]).astype(np.float64) ** 2
    return _k_reciprocal_loops(dist, q_g.shape[0], k1, k2, lam)


def original_rerank_on_features(qf, gf, k1, k2, lam):
    """The original re-ranking on features (Zhong et al.; reid-strong-baseline), loop by loop.

    Squared Euclidean distance of the features (not squared again), each row divided by its
    maximum, then the k-reciprocal algorithm (float64 here; the original keeps V in float16).
    """
    feat = np.concatenate([qf, gf]).astype(np.float64)
    n = feat.shape[0]
    dist = np.empty((n, n))
    for i in range(n):
        for j in range(n):
            dist[i, j] = np.sum((feat[i] - feat[j]) ** 2)
    return _k_reciprocal_loops(dist, qf.shape[0], k1, k2, lam)


def _k_reciprocal_loops(dist, nq, k1, k2, lam):
    """The k-reciprocal algorithm (Zhong et al. 2017) on a dense (Q+G)² distance, row by row."""
    dist = dist / dist.max(axis=1, keepdims=True)
    n = dist.shape[0]
    initial_rank = np.argsort(dist, axis=1, kind="stable")
    v = np.zeros_like(dist)
    k_half = int(np.around(k1 / 2.0)) + 1
    for i in range(n):
        forward = initial_rank[i, : k1 + 1]
        backward = initial_rank[forward, : k1 + 1]
        reciprocal = forward[np.where(backward == i)[0]]
        expansion = reciprocal
        for cand in reciprocal:
            c_forward = initial_rank[cand, :k_half]
            c_backward = initial_rank[c_forward, :k_half]
            c_reciprocal = c_forward[np.where(c_backward == cand)[0]]
            if len(np.intersect1d(c_reciprocal, reciprocal)) > 2.0 / 3 * len(c_reciprocal):
                expansion = np.append(expansion, c_reciprocal)
        expansion = np.unique(expansion)
        weight = np.exp(-dist[i, expansion])
        v[i, expansion] = weight / weight.sum()
    if k2 != 1:
        v = np.stack([v[initial_rank[i, :k2]].mean(axis=0) for i in range(n)])
    jaccard = np.zeros((nq, n))
    for i in range(nq):
        overlap = np.minimum(v[i][None, :], v).sum(axis=1)
        jaccard[i] = 1 - overlap / (2.0 - overlap)
    return ((1 - lam) * jaccard + lam * dist[:nq])[:, nq:]


def _features(nq=30, ng=90, dim=12, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 10, (nq + ng,), generator=g)
    x = torch.randn(10, dim, generator=g, dtype=dtype)[ids] + 0.8 * torch.randn(
        nq + ng, dim, generator=g, dtype=dtype
    )
    return x[:nq], x[nq:], ids[:nq], ids[nq:]


def _reference(qf, gf, metric, k1, k2, lam, convention="features"):
    q, g = prepare_features(qf, metric), prepare_features(gf, metric)
    if convention == "features":  # cosine: the original on L2-normalised features
        return original_rerank_on_features(q.numpy(), g.numpy(), k1, k2, lam)
    mats = [pairwise_distance(a, b, metric).numpy() for a, b in ((q, g), (q, q), (g, g))]
    return dense_k_reciprocal(*mats, k1=k1, k2=k2, lam=lam)


@pytest.mark.parametrize("convention", ["features", "distances"])
@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
@pytest.mark.parametrize(("k1", "k2", "lam"), [(20, 6, 0.3), (7, 1, 0.5), (5, 3, 0.0)])
def test_torch_backend_matches_dense_reference(metric, k1, k2, lam, convention):
    qf, gf, _, _ = _features()
    expected = _reference(qf, gf, metric, k1, k2, lam, convention)
    cfg = RerankConfig(k1=k1, k2=k2, lambda_value=lam, convention=convention, chunk_size=1)
    got = k_reciprocal_rerank(qf, gf, metric=metric, config=cfg)
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-10)


def test_default_is_the_original_on_features_not_squared_distances():
    qf, gf, _, _ = _features(seed=4)
    got = k_reciprocal_rerank(qf, gf, metric="euclidean")
    original = original_rerank_on_features(qf.numpy(), gf.numpy(), 20, 6, 0.3)
    np.testing.assert_allclose(got.numpy(), original, rtol=0, atol=1e-10)
    squared = _reference(qf, gf, "euclidean", 20, 6, 0.3, "distances")  # ‖a-b‖⁴ in effect
    assert np.abs(squared - original).max() > 1e-3


def test_float32_features_and_faiss_backend_close_to_reference():
    qf, gf, _, _ = _features(dtype=torch.float32, seed=1)
    expected = _reference(qf.double(), gf.double(), "cosine", 20, 6, 0.3)
    for backend in (KnnBackend.TORCH, KnnBackend.FAISS):
        cfg = RerankConfig(backend=backend)
        got = k_reciprocal_rerank(qf, gf, metric="cosine", config=cfg)
        np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-5)


def test_topk_and_evaluation_use_the_same_distances():
    qf, gf, qp, gp = _features(nq=20, ng=60, seed=2)
    qc, gc = torch.zeros(20, dtype=torch.long), torch.ones(60, dtype=torch.long)
    dense = k_reciprocal_rerank(qf, gf)
    vals, idx = k_reciprocal_rerank_topk(qf, gf, 7, config=RerankConfig(chunk_size=1))
    order = np.argsort(dense.numpy(), axis=1, kind="stable")[:, :7]
    np.testing.assert_array_equal(idx.numpy(), order)
    np.testing.assert_allclose(vals.numpy(), np.take_along_axis(dense.numpy(), order, 1), atol=0)
    res = evaluate_features(qf, gf, qp, gp, qc, gc, rerank=True)
    ref = evaluate_rank(dense, qp, gp, qc, gc)
    assert res.metric.startswith("rerank(cosine")
    np.testing.assert_array_equal(res.cmc, ref.cmc)
    assert res.mAP == ref.mAP and res.mINP == ref.mINP


def test_config_validation_and_small_inputs():
    with pytest.raises(ValueError, match="lambda_value"):
        RerankConfig(lambda_value=1.5)
    with pytest.raises(ValueError, match="k2"):
        RerankConfig(k1=3, k2=5)
    with pytest.raises(ValueError, match="at least 21 features"):
        k_reciprocal_rerank(torch.randn(3, 4), torch.randn(5, 4))
    # more identical features than k1 + 1: some rows miss themselves in their neighbour list
    same = k_reciprocal_rerank(torch.ones(4, 3), torch.ones(30, 3), config=RerankConfig(k1=5, k2=2))
    assert same.shape == (4, 30) and torch.isfinite(same).all()


def test_average_query_expansion_matches_explicit_loop():
    qf, gf, _, _ = _features(nq=8, ng=25, dtype=torch.float32, seed=3)
    k, alpha = 5, 3.0
    x = torch.cat([qf, gf]).double()
    xn = torch.nn.functional.normalize(x, dim=1)
    expected = []
    for i in range(x.shape[0]):
        sims = (xn @ xn[i]).numpy()
        top = np.argsort(-sims, kind="stable")[:k]  # itself first
        w = torch.from_numpy(sims[top] ** alpha)
        expected.append((x[top] * w[:, None]).mean(0))
    expected = torch.stack(expected).float()
    q2, g2 = average_query_expansion(qf, gf, k=k, alpha=alpha, chunk_size=1)
    torch.testing.assert_close(torch.cat([q2, g2]), expected, rtol=1e-5, atol=1e-6)
