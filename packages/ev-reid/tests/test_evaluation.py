"""CMC/mAP/mINP against an explicit per-query reference (SYSTEMS.md §3.3), chunking, CUHK03."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from ev_reid.evaluation import (
    ROW_BLOCK,
    RankResult,
    evaluate_features,
    evaluate_rank,
    extract_features,
    pairwise_distance,
    prepare_features,
)
from ev_reid.evaluation import rank as rank_module


def reference_market(distmat, q_pids, g_pids, q_camids, g_camids, max_rank):
    """SYSTEMS.md §3.3 literally: one query at a time, stable sort, remove, cumsum."""
    cmcs, aps, inps = [], [], []
    for i in range(distmat.shape[0]):
        order = np.argsort(distmat[i], kind="stable")
        removed = (g_pids[order] == q_pids[i]) & (g_camids[order] == q_camids[i])
        matches = (g_pids[order][~removed] == q_pids[i]).astype(np.int64)
        n_rel = matches.sum()
        if n_rel == 0:
            continue
        cmc = np.minimum(np.cumsum(matches), 1)
        cmc = np.concatenate([cmc, np.full(max(0, max_rank - cmc.size), cmc[-1])])[:max_rank]
        cmcs.append(cmc)
        hits_at_k = np.cumsum(matches)
        k = np.arange(1, matches.size + 1)
        aps.append(float(np.sum(hits_at_k / k * matches) / n_rel))
        inps.append(float(n_rel / (np.flatnonzero(matches)[-1] + 1)))
    return np.mean(cmcs, axis=0), float(np.mean(aps)), float(np.mean(inps)), len(aps)


def _random_case(rng, kind):
    nq, ng = int(rng.integers(2, 60)), int(rng.integers(2, 200))
    q_pids = rng.integers(0, 12, nq)  # pid 0 in the gallery plays the distractor
    g_pids = rng.integers(0, 12, ng)
    q_cam, g_cam = rng.integers(0, 3, nq), rng.integers(0, 3, ng)
    if kind == "ties32":
        d = rng.integers(-2, 3, (nq, ng)).astype(np.float32)  # many ties, negatives
    elif kind == "ties64":
        d = rng.integers(0, 4, (nq, ng)).astype(np.float64)
    elif kind == "inf":
        d = np.where(rng.random((nq, ng)) < 0.2, np.inf, rng.random((nq, ng)))
    elif kind == "signed_zero":
        d = np.where(rng.random((nq, ng)) < 0.5, -0.0, 0.0).astype(np.float32)
    else:
        d = rng.random((nq, ng)).astype(np.float32 if kind == "rand32" else np.float64)
    return d, q_pids, g_pids, q_cam, g_cam


KINDS = ["rand32", "rand64", "ties32", "ties64", "inf", "signed_zero"]


@pytest.mark.parametrize("kind", KINDS)
def test_matches_reference_on_random_cases(kind):
    rng = np.random.default_rng(KINDS.index(kind))
    checked = 0
    for _ in range(8):
        d, qp, gp, qc, gc = _random_case(rng, kind)
        ref = reference_market(d, qp, gp, qc, gc, 20)
        if ref[3] == 0:
            with pytest.raises(ValueError, match="no query has a true match"):
                evaluate_rank(d, qp, gp, qc, gc, max_rank=20)
            continue
        cmc, mAP, mINP, n_valid = ref
        for chunk in (None, 1):
            res = evaluate_rank(torch.from_numpy(d), qp, gp, qc, gc, max_rank=20, chunk_size=chunk)
            np.testing.assert_allclose(res.cmc, cmc, rtol=0, atol=1e-12)
            assert res.mAP == pytest.approx(mAP, abs=1e-12)
            assert res.mINP == pytest.approx(mINP, abs=1e-12)
            assert res.num_valid_queries == n_valid
            assert res.num_queries == d.shape[0]
        checked += 1
    assert checked >= 4


@pytest.mark.parametrize("kind", ["rand32", "ties64", "inf"])
def test_row_groups_give_the_same_metrics(kind, monkeypatch):
    # tiny group budgets force the grouped paths (same-id rows, candidate extraction, ties)
    rng = np.random.default_rng(11)
    checked = 0
    for _ in range(6):
        d, qp, gp, qc, gc = _random_case(rng, kind)
        gp[: gp.size // 2] = qp[0]  # one identity with many gallery images
        ref = reference_market(d, qp, gp, qc, gc, 20)
        if ref[3] == 0:
            continue
        for same_id, extract, ties in ((1, 1, 1), (7, 50, 3), (1 << 18, 1 << 21, 1 << 22)):
            monkeypatch.setattr(rank_module, "_SAME_ID_ENTRIES", same_id)
            monkeypatch.setattr(rank_module, "_EXTRACT_ENTRIES", extract)
            monkeypatch.setattr(rank_module, "_TIE_BATCH_ENTRIES", ties)
            res = evaluate_rank(torch.from_numpy(d), qp, gp, qc, gc, max_rank=20)
            np.testing.assert_allclose(res.cmc, ref[0], rtol=0, atol=1e-12)
            assert res.mAP == pytest.approx(ref[1], abs=1e-12)
            assert res.mINP == pytest.approx(ref[2], abs=1e-12)
        checked += 1
    assert checked >= 3


def test_hand_computed_case():
    # gallery:   g0       g1      g2      g3            g4      g5
    g_pids = [1, 2, 1, 0, 1, 3]  # g3 is a distractor (pid 0)
    g_cams = [0, 1, 1, 1, 2, 0]
    q_pids = [1, 2, 5, 3]
    q_cams = [0, 0, 1, 0]
    distmat = np.array(
        [
            [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],
            [0.5, 0.3, 0.3, 0.3, 0.9, 0.3],
            [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],
            [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],
        ],
        dtype=np.float32,
    )
    # q0 (pid 1, cam 0): g0 is removed (same pid and camera). Remaining ranking:
    #   g1 miss, g2 hit (rank 2), g3 miss, g4 hit (rank 4), g5 miss
    #   AP = (1/2 + 2/4) / 2 = 0.5, INP = 2 / 4 = 0.5, first match at rank 2.
    # q1 (pid 2, cam 0): g1, g2, g3, g5 tie at 0.3 and are ordered by index, so g1 (the
    #   only true match) is rank 1: AP = 1, INP = 1. (Descending tie order would give rank 4.)
    # q2 (pid 5) has no gallery entry; q3 (pid 3, cam 0) only matches g5, which is in the same
    #   camera and removed: both are skipped.
    res = evaluate_rank(distmat, q_pids, g_pids, q_cams, g_cams, max_rank=6)
    assert res.num_valid_queries == 2 and res.num_queries == 4
    np.testing.assert_array_equal(res.cmc, [0.5, 1.0, 1.0, 1.0, 1.0, 1.0])
    assert res.mAP == 0.75
    assert res.mINP == 0.75
    np.testing.assert_array_equal(res.query_first_rank, [2, 1, 0, 0])
    np.testing.assert_array_equal(res.query_ap[:2], [0.5, 1.0])
    assert np.isnan(res.query_ap[2:]).all()
    cmc, mAP, mINP = res  # unpacks like fast-reid
    assert cmc is res.cmc and mAP == 0.75 and mINP == 0.75
    assert res.rank(1) == 0.5 and res.as_dict()["rank5"] == 1.0


def test_max_rank_longer_than_gallery_keeps_last_value():
    res = evaluate_rank([[0.2, 0.1]], [1], [1, 2], [0], [1, 1], max_rank=5)
    np.testing.assert_array_equal(res.cmc, [0, 1, 1, 1, 1])


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_chunked_features_equal_full_matrix_bitwise(metric):
    g = torch.Generator().manual_seed(0)
    nq, ng = 2 * ROW_BLOCK + 37, 300
    centers = torch.randn(40, 16, generator=g)
    qp, gp = torch.randint(0, 40, (nq,), generator=g), torch.randint(0, 40, (ng,), generator=g)
    qf = centers[qp] + torch.randn(nq, 16, generator=g)
    gf = centers[gp] + torch.randn(ng, 16, generator=g)
    qc, gc = torch.randint(0, 4, (nq,), generator=g), torch.randint(0, 4, (ng,), generator=g)
    full = pairwise_distance(prepare_features(qf, metric), prepare_features(gf, metric), metric)
    ref = evaluate_rank(full, qp, gp, qc, gc, chunk_size=nq)
    assert 0.05 < ref.mAP < 0.95  # a non-trivial ranking
    for chunk in (1, ROW_BLOCK, None):
        res = evaluate_features(qf, gf, qp, gp, qc, gc, metric=metric, chunk_size=chunk)
        assert res.metric == metric
        np.testing.assert_array_equal(res.cmc, ref.cmc)
        assert res.mAP == ref.mAP and res.mINP == ref.mINP
        np.testing.assert_array_equal(res.query_ap, ref.query_ap)
    # and both agree with the literal reference
    cmc, mAP, mINP, _ = reference_market(
        full.numpy(), qp.numpy(), gp.numpy(), qc.numpy(), gc.numpy(), 50
    )
    np.testing.assert_allclose(ref.cmc, cmc, atol=1e-12)
    assert ref.mAP == pytest.approx(mAP, abs=1e-12) and ref.mINP == pytest.approx(mINP, abs=1e-12)


def test_cuhk03_single_shot_equals_market_when_one_image_per_identity():
    rng = np.random.default_rng(3)
    ng = 30
    g_pids = np.arange(ng)  # one gallery image per identity
    g_cams = np.ones(ng, dtype=np.int64)
    q_pids = rng.integers(0, ng, 25)
    q_cams = np.zeros(25, dtype=np.int64)
    d = rng.random((25, ng))
    market = evaluate_rank(d, q_pids, g_pids, q_cams, g_cams, max_rank=10)
    cuhk = evaluate_rank(d, q_pids, g_pids, q_cams, g_cams, max_rank=10, use_metric_cuhk03=True)
    np.testing.assert_allclose(cuhk.cmc, market.cmc, atol=1e-12)
    assert cuhk.mAP == market.mAP and cuhk.protocol == "cuhk03"


def test_cuhk03_single_shot_probability():
    # q (pid 1, cam 0); ranked gallery: pid 2 (d .1), pid 1 cam 1 (d .2), pid 2 (d .3).
    # One image of pid 2 is drawn: with probability 1/2 the one ranked first, which pushes the
    # true match to single-shot rank 2; otherwise the true match is first. E[CMC@1] = 0.5.
    d = np.array([[0.1, 0.2, 0.3]])
    kw = dict(max_rank=3, use_metric_cuhk03=True, num_repeats=4000)
    res = evaluate_rank(d, [1], [2, 1, 2], [0], [1, 1, 1], **kw, seed=1)
    assert res.cmc[0] == pytest.approx(0.5, abs=0.05)  # 5 standard deviations
    assert res.cmc[1] == 1.0
    again = evaluate_rank(d, [1], [2, 1, 2], [0], [1, 1, 1], **kw, seed=1)
    np.testing.assert_array_equal(res.cmc, again.cmc)
    # AP uses the full list (true match at rank 2)
    assert res.mAP == 0.5


def test_cuhk03_independent_of_chunking():
    rng = np.random.default_rng(5)
    d, qp, gp, qc, gc = _random_case(rng, "rand64")
    d = np.vstack([d] * 6)[: ROW_BLOCK + 20]
    qp, qc = np.resize(qp, d.shape[0]), np.resize(qc, d.shape[0])
    kw = dict(use_metric_cuhk03=True, max_rank=5, num_repeats=3)
    a = evaluate_rank(d, qp, gp, qc, gc, chunk_size=1, **kw)
    b = evaluate_rank(d, qp, gp, qc, gc, chunk_size=4096, **kw)
    np.testing.assert_array_equal(a.cmc, b.cmc)


def test_bad_inputs():
    with pytest.raises(ValueError, match="NaN"):
        evaluate_rank([[np.nan, 1.0]], [1], [1, 1], [0], [1, 1])
    with pytest.raises(ValueError, match="g_pids has 3 entries"):
        evaluate_rank([[0.0, 1.0]], [1], [1, 1, 2], [0], [1, 1])
    with pytest.raises(ValueError, match="integers"):
        evaluate_rank([[0.0, 1.0]], [1.5], [1, 1], [0], [1, 1])
    with pytest.raises(ValueError, match="no query has a true match"):
        evaluate_rank([[0.0, 1.0]], [1], [1, 2], [0], [0, 1])
    with pytest.raises(ValueError, match="NaN or inf"):
        evaluate_features(
            torch.full((2, 3), float("nan")), torch.ones(2, 3), [1, 1], [1, 1], [0, 0], [1, 1]
        )
    with pytest.raises(ValueError, match=r"unknown metric|is not a valid"):
        evaluate_features(
            torch.ones(2, 3), torch.ones(2, 3), [1, 1], [1, 1], [0, 0], [1, 1], metric="l1"
        )


class _StripeModel(nn.Module):
    """Features depend on the column order, so flipping changes them."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.linspace(-1, 1, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bchw,w->bc", x, self.w)


def test_extract_features_flip_and_normalize():
    torch.manual_seed(0)
    images = torch.randn(5, 3, 2, 4)
    loader = [(images[:3], torch.tensor([1, 2, 3])), (images[3:], torch.tensor([4, 5]))]
    model = _StripeModel().train()
    w = model.w.detach()
    plain = torch.einsum("bchw,w->bc", images, w)
    flipped = torch.einsum("bchw,w->bc", images.flip(3), w)
    out = extract_features(model, loader)
    torch.testing.assert_close(out, plain)
    assert model.training  # mode restored
    out = extract_features(model, [{"img": images}], flip=True, normalize=True)
    torch.testing.assert_close(out, torch.nn.functional.normalize((plain + flipped) / 2, dim=1))


@pytest.mark.gpu
def test_cuda_evaluation_matches_cuda_full_matrix():
    g = torch.Generator().manual_seed(1)
    qf, gf = torch.randn(300, 32, generator=g), torch.randn(500, 32, generator=g)
    qp, gp = torch.randint(0, 30, (300,), generator=g), torch.randint(0, 30, (500,), generator=g)
    qc, gc = torch.zeros(300, dtype=torch.long), torch.ones(500, dtype=torch.long)
    res = evaluate_features(qf, gf, qp, gp, qc, gc, device="cuda", chunk_size=1)
    full = pairwise_distance(
        prepare_features(qf.cuda(), "cosine"), prepare_features(gf.cuda(), "cosine")
    )
    ref = evaluate_rank(full, qp, gp, qc, gc)
    assert isinstance(res, RankResult)
    np.testing.assert_array_equal(res.cmc, ref.cmc)
    assert res.mAP == ref.mAP
