"""The native backend's kd-tree path (CPU k-NN / ball query) against the naive loop references:
values, padding, ragged and empty clouds, K beyond the cloud, exact ties and points on the
radius, every routing branch (re-queries, dual-tree pair blocks, per-row fetch, early-stopping
scan), gradients; and the dispatcher's reasons and size-aware ``auto``.

The size thresholds are lowered so that tiny clouds take the kd-tree path (fast tests); the
production thresholds are covered against pytorch3d in ``test_ops_pytorch3d.py``.
"""

from __future__ import annotations

import pytest
import torch
from points_reference import naive_ball_query, naive_knn

from ev_points.ops import (
    _kdtree,
    _native,
    backends,
    ball_query,
    kdtree_status,
    knn_points,
    resolve_backend,
)

NATIVE = {"backend": "native"}


@pytest.fixture
def kdtree(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """Route even tiny clouds through the kd-tree."""
    monkeypatch.setattr(_kdtree, "MIN_POINTS", 1)
    monkeypatch.setattr(_kdtree, "MIN_QUERIES", 1)
    monkeypatch.setattr(_kdtree, "MIN_PAIRS", 1)
    return monkeypatch


def _clouds(seed: int, n=2, p1=40, p2=60, d=3, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, p1, d, generator=g, dtype=dtype), torch.rand(
        n, p2, d, generator=g, dtype=dtype
    )


def _grid(seed: int, n: int, p: int, d: int = 3, side: int = 3) -> torch.Tensor:
    """Integer points: many exactly equal distances and exact duplicates."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, side, (n, p, d), generator=g).double()


def _on_kdtree(p1: torch.Tensor, p2: torch.Tensor) -> None:
    assert _native.selection_path(p1, p2)[0] == "kdtree"


# ---------------------------------------------------------------- knn_points
@pytest.mark.parametrize("norm", [1, 2])
@pytest.mark.parametrize("K", [1, 5, 70])
def test_knn_matches_naive_ragged(kdtree, norm: int, K: int) -> None:
    p1, p2 = _clouds(norm * 100 + K, n=4)
    l1, l2 = torch.tensor([40, 17, 0, 40]), torch.tensor([60, 3, 60, 0])
    _on_kdtree(p1, p2)
    res = knn_points(p1, p2, l1, l2, norm=norm, K=K, return_nn=True, **NATIVE)
    dists, idx = naive_knn(p1, p2, l1, l2, K=K, norm=norm)
    torch.testing.assert_close(res.idx, idx, rtol=0, atol=0)
    torch.testing.assert_close(res.dists, dists, rtol=1e-12, atol=1e-12)
    # padding: idx / dists / knn are 0 past lengths2 and on rows past lengths1
    assert (res.idx[1, :, 3:] == 0).all() and (res.dists[1, :, 3:] == 0).all()
    assert (res.knn[1, :, 3:] == 0).all() and (res.idx[1, 17:] == 0).all()
    assert (res.idx[2:] == 0).all() and (res.dists[2:] == 0).all()


@pytest.mark.parametrize("d", [1, 2])
def test_knn_low_dimensions(kdtree, d: int) -> None:
    p1, p2 = _clouds(3, p1=30, p2=50, d=d)
    res = knn_points(p1, p2, K=6, **NATIVE)
    torch.testing.assert_close(res.idx, naive_knn(p1, p2, K=6)[1], rtol=0, atol=0)


@pytest.mark.parametrize("norm", [1, 2])
def test_knn_ties_and_duplicates_requery(kdtree, norm: int) -> None:
    # a 3x3x3 grid holds 27 positions for 80 points: ties everywhere, at every K-th rank, so
    # rows cannot be proven from K + SLACK candidates and are queried again (up to all points)
    p1, p2 = _grid(0, 2, 25), _grid(1, 2, 80)
    _on_kdtree(p1, p2)
    for K in (1, 7, 30):
        res = knn_points(p1, p2, norm=norm, K=K, **NATIVE)
        torch.testing.assert_close(res.idx, naive_knn(p1, p2, K=K, norm=norm)[1], rtol=0, atol=0)


def test_knn_float32_ties_decided_in_float32(kdtree) -> None:
    # points on the unit sphere around queries at the origin: their float64 distances all
    # differ, but in float32 they round to a handful of values (massive ties). The kd-tree
    # (float64) only proposes candidates; the order is pytorch3d's: float32
    # ((dx² + dy²) + dz²), ties to the lower index
    g = torch.Generator().manual_seed(4)
    p2 = torch.nn.functional.normalize(torch.randn(1, 300, 3, generator=g), dim=-1)
    p1 = torch.zeros(1, 2, 3)
    p1[0, 1] = 1e-7

    def order(d: torch.Tensor) -> torch.Tensor:
        return torch.tensor([sorted(range(300), key=lambda j: (float(r[j]), j))[:9] for r in d])

    diff = p1[0, :, None, :] - p2[0, None, :, :]
    sq = diff * diff
    expect = order((sq[..., 0] + sq[..., 1]) + sq[..., 2])
    assert not torch.equal(expect, order(diff.double().square().sum(-1)))  # float32 decides
    res = knn_points(p1, p2, K=9, **NATIVE)
    torch.testing.assert_close(res.idx[0], expect, rtol=0, atol=0)


def test_knn_chunked_and_requeried_equal(kdtree) -> None:
    p1, p2 = _clouds(5, n=3, p1=50, p2=70, dtype=torch.float32)
    full = knn_points(p1, p2, K=6, **NATIVE)
    kdtree.setattr(_native, "CHUNK_ELEMENTS", 40)  # a few rows per tree query
    kdtree.setattr(_kdtree, "SLACK", 0)  # no spare candidate: rows re-queried
    chunked = knn_points(p1, p2, K=6, **NATIVE)
    torch.testing.assert_close(chunked.idx, full.idx, rtol=0, atol=0)
    torch.testing.assert_close(chunked.dists, full.dists, rtol=0, atol=0)


@pytest.mark.parametrize("norm", [1, 2])
def test_knn_gradcheck(kdtree, norm: int) -> None:
    p1, p2 = _clouds(6, n=2, p1=5, p2=8)
    l1, l2 = torch.tensor([5, 3]), torch.tensor([8, 2])
    _on_kdtree(p1, p2)

    def fn(a, b):
        return knn_points(a, b, l1, l2, norm=norm, K=3, return_nn=True, **NATIVE)[::2]

    assert torch.autograd.gradcheck(fn, (p1.requires_grad_(), p2.requires_grad_()))


# ---------------------------------------------------------------- ball_query
@pytest.mark.parametrize("K", [1, 4, 50])
@pytest.mark.parametrize("radius", [0.15, 0.4, 2.0])
def test_ball_query_matches_naive_ragged(kdtree, K: int, radius: float) -> None:
    p1, p2 = _clouds(7 + K, n=4, p1=40, p2=90)
    p1[0, :5] += 5.0  # far from every point: no neighbour
    l1, l2 = torch.tensor([40, 11, 0, 40]), torch.tensor([90, 25, 90, 0])
    _on_kdtree(p1, p2)
    res = ball_query(p1, p2, l1, l2, K=K, radius=radius, **NATIVE)
    dists, idx = naive_ball_query(p1, p2, l1, l2, K=K, radius=radius)
    torch.testing.assert_close(res.idx, idx, rtol=0, atol=0)
    torch.testing.assert_close(res.dists, dists, rtol=1e-12, atol=1e-12)
    pad = idx < 0
    assert (res.knn[pad] == 0).all() and (res.dists[pad] == 0).all()
    assert (res.idx[0, :5] == -1).all() and (res.idx[2:] == -1).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ball_query_strict_radius_on_a_grid(kdtree, dtype: torch.dtype) -> None:
    # integer grid, radius 1: neighbours at distance exactly 1 are outside (dist² < r² strict);
    # sqrt(2) radius: the squared radius rounds in the input dtype, as pytorch3d's does
    p1, p2 = _grid(8, 2, 30, side=4).to(dtype), _grid(9, 2, 90, side=4).to(dtype)
    for radius in (1.0, 2.0**0.5, 1.5):
        res = ball_query(p1, p2, K=9, radius=radius, **NATIVE)
        _, idx = naive_ball_query(p1, p2, K=9, radius=radius)
        torch.testing.assert_close(res.idx, idx, rtol=0, atol=0)


@pytest.mark.parametrize("d", [1, 2])
def test_ball_query_low_dimensions(kdtree, d: int) -> None:
    p1, p2 = _clouds(10, p1=30, p2=60, d=d)
    res = ball_query(p1, p2, K=5, radius=0.1, **NATIVE)
    torch.testing.assert_close(
        res.idx, naive_ball_query(p1, p2, K=5, radius=0.1)[1], rtol=0, atol=0
    )


def _clustered(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """60 points in a tight cluster among 80 uniform ones (dense and sparse balls together)."""
    g = torch.Generator().manual_seed(seed)
    centre = torch.rand(2, 1, 3, generator=g, dtype=torch.float64)
    p2 = torch.cat(
        [centre + 0.01 * torch.randn(2, 60, 3, generator=g, dtype=torch.float64),
         torch.rand(2, 80, 3, generator=g, dtype=torch.float64)], 1
    )[:, torch.randperm(140, generator=g)]  # fmt: skip
    return p2[:, ::3].clone(), p2


ROUTES = {
    # one dual-tree pass per cloud
    "pairs": ({"DENSE_MIN": 10**6}, 1 << 23, {"_ball_by_pairs"}),
    # pair blocks bounded by a tiny chunk: split blocks, rows with a big bound sent per row
    "blocks": ({"DENSE_MIN": 10**6}, 200, {"_ball_by_pairs", "_ball_by_rows", "_ball_fetch"}),
    # the sample sees balls larger than K: per row, bounded fetches and index-order scans
    "rows": (
        {"DENSE_MIN": 2, "DENSE_RATIO": 1, "_SCAN_MIN": 4},
        1 << 23,
        {"_ball_by_rows", "_ball_fetch", "_ball_scan"},
    ),
}


@pytest.mark.parametrize("route", sorted(ROUTES))
@pytest.mark.parametrize("radius", [0.2, 0.03])  # 0.03: cells coarser than the radius
def test_ball_query_routes(kdtree, route: str, radius: float) -> None:
    settings, chunk, expect_called = ROUTES[route]
    for name, value in settings.items():
        kdtree.setattr(_kdtree, name, value)
    kdtree.setattr(_native, "CHUNK_ELEMENTS", chunk)
    called = set()
    for fn in ("_ball_by_pairs", "_ball_by_rows", "_ball_fetch", "_ball_scan"):
        original = getattr(_kdtree, fn)

        def spy(*args, _fn=fn, _original=original, **kwargs):
            called.add(_fn)
            return _original(*args, **kwargs)

        kdtree.setattr(_kdtree, fn, spy)
    p1, p2 = _clustered(11)
    l1, l2 = torch.tensor([47, 20]), torch.tensor([140, 100])
    res = ball_query(p1, p2, l1, l2, K=6, radius=radius, **NATIVE)
    torch.testing.assert_close(
        res.idx, naive_ball_query(p1, p2, l1, l2, K=6, radius=radius)[1], rtol=0, atol=0
    )
    if radius == 0.2:  # the smaller radius may not need every branch
        assert called == expect_called


@pytest.mark.parametrize("chunk", [1 << 23, 200])  # 200: too small for the self-join
def test_ball_query_self_join(kdtree, chunk: int) -> None:
    """``p1`` and ``p2`` the same tensor: the tree's self-join (each pair once, both rows),
    including a point's own distance 0, duplicates and points exactly on the radius; clouds
    whose two lengths differ are not self-joins."""
    kdtree.setattr(_native, "CHUNK_ELEMENTS", chunk)
    kdtree.setattr(_kdtree, "DENSE_MIN", 10**6)
    called = []
    original = _kdtree._ball_self
    kdtree.setattr(_kdtree, "_ball_self", lambda *a: called.append(1) or original(*a))
    p = torch.cat([_grid(15, 2, 40, side=4) * 0.25, _clustered(16)[1][:, :60]], 1)[:, :90]
    lengths1, lengths2 = torch.tensor([90, 60]), torch.tensor([90, 30])
    for radius in (0.25, 0.3):
        res = ball_query(p, p, lengths1, lengths2, K=7, radius=radius, **NATIVE)
        _, expect = naive_ball_query(p, p, lengths1, lengths2, K=7, radius=radius)
        torch.testing.assert_close(res.idx, expect, rtol=0, atol=0)
    assert len(called) == (2 if chunk > 10**4 else 0)  # cloud 0, at both radii


def test_ball_query_gradcheck(kdtree) -> None:
    p1, p2 = _clouds(12, n=1, p1=4, p2=12)
    _on_kdtree(p1, p2)

    def fn(a, b):
        return ball_query(a, b, K=5, radius=0.6, **NATIVE)[::2]

    assert torch.autograd.gradcheck(fn, (p1.requires_grad_(), p2.requires_grad_()))


# ---------------------------------------------------------------- path selection
def test_selection_path_reasons(kdtree) -> None:
    p1, p2 = _clouds(13, dtype=torch.float32)
    assert _native.selection_path(p1, p2)[0] == "kdtree"
    path, why = _native.selection_path(p1.half(), p2.half())
    assert path == "brute" and "float16" in why
    bad = p2.clone()
    bad[0, 0, 0] = float("nan")
    assert _native.selection_path(p1, bad)[0] == "brute"
    feats1, feats2 = _clouds(14, d=4)  # D > 3: features, not point clouds
    assert _native.selection_path(feats1, feats2)[0] == "brute"
    kdtree.setattr(_kdtree, "scipy_import_error", lambda: "scipy.spatial is not importable (t)")
    path, why = _native.selection_path(p1, p2)
    assert path == "brute" and "scipy" in why
    assert "scipy" in kdtree_status("cpu", torch.float32)
    # the brute-force fallback gives the same answer
    torch.testing.assert_close(
        knn_points(p1, p2, K=4, **NATIVE).idx, naive_knn(p1, p2, K=4)[1], rtol=0, atol=0
    )


def test_production_thresholds() -> None:
    small, big = torch.rand(1, 200, 3), torch.rand(1, 2000, 3)
    assert _native.selection_path(small, small)[0] == "brute"
    assert _native.selection_path(big, big)[0] == "kdtree"
    assert kdtree_status("cpu", torch.float64) is None
    assert "CPU" in kdtree_status("meta", torch.float32)


def test_auto_is_size_aware(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu, f32 = torch.device("cpu"), torch.float32
    monkeypatch.setattr(backends, "_pytorch3d_import_error", lambda: None)
    # pytorch3d's C++ loops win on small problems, native's kd-tree / FPS on large ones
    assert resolve_backend("auto", cpu, f32, op="knn_points", shape=(100, 100, 3)) == "pytorch3d"
    assert resolve_backend("auto", cpu, f32, op="knn_points", shape=(4096, 4096, 3)) == "native"
    assert resolve_backend("auto", cpu, f32, op="ball_query", shape=(1000, 1000, 3)) == "pytorch3d"
    assert resolve_backend("auto", cpu, f32, op="ball_query", shape=(4096, 4096, 3)) == "native"
    assert resolve_backend("auto", cpu, f32, op="fps", shape=(8, 1024)) == "pytorch3d"
    assert resolve_backend("auto", cpu, f32, op="fps", shape=(8, 2048)) == "native"
    assert resolve_backend("auto", cpu, f32) == "native"  # no size given: a large problem
    assert resolve_backend("auto", cpu, torch.float64, op="knn_points", shape=(9, 9, 3)) == "native"
    assert resolve_backend("auto", torch.device("cuda"), f32) == "pytorch3d"
    monkeypatch.setattr(backends, "_pytorch3d_import_error", lambda: "not importable (test)")
    assert resolve_backend("auto", cpu, f32, op="knn_points", shape=(100, 100, 3)) == "native"
    assert resolve_backend("auto", torch.device("cuda"), f32) == "native"
