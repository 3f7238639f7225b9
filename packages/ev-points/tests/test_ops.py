"""Point ops against naive loop references (values, padding, ragged lengths, ties, gradients)
and against pytorch3d when it is installed."""

from __future__ import annotations

import pytest
import torch
from points_reference import naive_ball_query, naive_fps, naive_knn

from ev_points.ops import (
    PointOpsError,
    _native,
    backend_status,
    backends,
    ball_query,
    group_points,
    interpolate_features,
    knn_gather,
    knn_points,
    resolve_backend,
    sample_farthest_points,
    three_interpolate,
    three_nn,
)

NATIVE = {"backend": "native"}


def _clouds(seed: int, n=2, p1=13, p2=17, d=3, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, p1, d, generator=g, dtype=dtype), torch.rand(
        n, p2, d, generator=g, dtype=dtype
    )


# ---------------------------------------------------------------- knn_points
@pytest.mark.parametrize("norm", [1, 2])
@pytest.mark.parametrize("K", [1, 5, 20])
def test_knn_matches_naive_ragged(norm: int, K: int) -> None:
    p1, p2 = _clouds(norm * 10 + K)
    l1, l2 = torch.tensor([13, 6]), torch.tensor([17, 3])
    res = knn_points(p1, p2, l1, l2, norm=norm, K=K, return_nn=True, **NATIVE)
    dists, idx = naive_knn(p1, p2, l1, l2, K=K, norm=norm)
    assert res.idx.dtype == torch.int64 and res.idx.shape == (2, 13, K)
    torch.testing.assert_close(res.idx, idx, rtol=0, atol=0)
    torch.testing.assert_close(res.dists, dists, rtol=1e-12, atol=1e-12)
    # padding: cloud 1 has 3 reference points and 6 queries
    if K > 3:
        assert (res.idx[1, :, 3:] == 0).all() and (res.dists[1, :, 3:] == 0).all()
        assert (res.knn[1, :, 3:] == 0).all()
    assert (res.dists[1, 6:] == 0).all() and (res.idx[1, 6:] == 0).all()
    expect_nn = torch.stack([p2[b][idx[b]] for b in range(2)])
    valid = torch.arange(K)[None, None, :, None] < l2[:, None, None, None]
    torch.testing.assert_close(res.knn, torch.where(valid, expect_nn, 0.0))


@pytest.mark.parametrize("norm", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
def test_knn_ties_go_to_the_lower_index(norm: int, dtype: torch.dtype) -> None:
    # integer grid: many exactly equal distances (more ties at the K-th than spare candidates),
    # exact in every dtype -- rows the candidate bound cannot prove are ranked over all points
    g = torch.Generator().manual_seed(0)
    p2 = torch.randint(0, 3, (2, 60, 3), generator=g).to(dtype)
    p1 = torch.randint(0, 3, (2, 9, 3), generator=g).to(dtype)
    for K in (1, 5, 7, 20):
        res = knn_points(p1, p2, torch.tensor([9, 4]), torch.tensor([60, 33]), norm=norm, K=K,
                         **NATIVE)  # fmt: skip
        _, idx = naive_knn(p1.double(), p2.double(), torch.tensor([9, 4]), torch.tensor([60, 33]),
                           K=K, norm=norm)  # fmt: skip
        torch.testing.assert_close(res.idx, idx, rtol=0, atol=0)


def test_half_precision_ball_query_on_a_grid() -> None:
    # float16 inputs: the exact test runs in float16, candidates in float32 must include them
    g = torch.Generator().manual_seed(1)
    p2 = torch.randint(0, 4, (2, 50, 3), generator=g).half()
    p1 = torch.randint(0, 4, (2, 11, 3), generator=g).half()
    for radius in (1.0, 1.5, 2.0):
        res = ball_query(p1, p2, K=6, radius=radius, **NATIVE)
        _, idx = naive_ball_query(p1.double(), p2.double(), K=6, radius=radius)
        torch.testing.assert_close(res.idx, idx, rtol=0, atol=0)


def test_knn_chunked_equals_unchunked(monkeypatch: pytest.MonkeyPatch) -> None:
    p1, p2 = _clouds(3, n=3, p1=50, p2=40, dtype=torch.float32)
    full = knn_points(p1, p2, K=6, **NATIVE)
    monkeypatch.setattr(_native, "CHUNK_ELEMENTS", 3 * 40 * 7)  # 7 query rows per block
    chunked = knn_points(p1, p2, K=6, **NATIVE)
    torch.testing.assert_close(chunked.idx, full.idx, rtol=0, atol=0)
    torch.testing.assert_close(chunked.dists, full.dists, rtol=0, atol=0)


@pytest.mark.parametrize("norm", [1, 2])
def test_knn_gradients(norm: int) -> None:
    p1, p2 = _clouds(4, p1=5, p2=7)
    l1, l2 = torch.tensor([5, 4]), torch.tensor([7, 2])
    p1.requires_grad_(True)
    p2.requires_grad_(True)
    res = knn_points(p1, p2, l1, l2, norm=norm, K=3, **NATIVE)
    w = torch.randn(
        res.dists.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1)
    )
    g1, g2 = torch.autograd.grad((res.dists * w).sum(), (p1, p2))
    # explicit gradient of sum w * d(p1_i, p2_idx) over valid (i, k)
    e1, e2 = torch.zeros_like(p1), torch.zeros_like(p2)
    for b in range(2):
        for i in range(int(l1[b])):
            for k in range(min(3, int(l2[b]))):
                j = int(res.idx[b, i, k])
                diff = (p1[b, i] - p2[b, j]).detach()
                g = 2 * diff if norm == 2 else torch.where(diff > 0, 1.0, -1.0).double()
                e1[b, i] += w[b, i, k] * g
                e2[b, j] -= w[b, i, k] * g
    torch.testing.assert_close(g1, e1)
    torch.testing.assert_close(g2, e2)
    assert not res.idx.requires_grad


def test_knn_gradcheck() -> None:
    p1, p2 = _clouds(5, n=1, p1=4, p2=6)
    fn = lambda a, b: knn_points(a, b, K=3, **NATIVE).dists  # noqa: E731
    assert torch.autograd.gradcheck(fn, (p1.requires_grad_(), p2.requires_grad_()))


def test_knn_gather_pads_with_zero() -> None:
    x = torch.arange(2 * 4 * 2, dtype=torch.float64).reshape(2, 4, 2)
    idx = torch.tensor([[[3, 0, 1]], [[1, 0, 0]]])
    out = knn_gather(x, idx, torch.tensor([4, 2]))
    assert out.shape == (2, 1, 3, 2)
    torch.testing.assert_close(out[0, 0], x[0, [3, 0, 1]])
    torch.testing.assert_close(out[1, 0, :2], x[1, [1, 0]])
    assert (out[1, 0, 2] == 0).all()


def test_knn_bad_arguments_raise() -> None:
    p1, p2 = _clouds(6)
    with pytest.raises(PointOpsError, match="norm"):
        knn_points(p1, p2, norm=3)
    with pytest.raises(PointOpsError, match="batch"):
        knn_points(p1, p2[:1])
    with pytest.raises(PointOpsError, match="lengths2"):
        knn_points(p1, p2, lengths2=torch.tensor([1, 99]))
    with pytest.raises(PointOpsError, match="K"):
        knn_points(p1, p2, K=0)


# ---------------------------------------------------------------- ball_query
@pytest.mark.parametrize("K", [1, 4, 30])
def test_ball_query_matches_naive_ragged(K: int) -> None:
    p1, p2 = _clouds(7 + K, p1=11, p2=30)
    l1, l2 = torch.tensor([11, 5]), torch.tensor([30, 9])
    res = ball_query(p1, p2, l1, l2, K=K, radius=0.45, **NATIVE)
    dists, idx = naive_ball_query(p1, p2, l1, l2, K=K, radius=0.45)
    torch.testing.assert_close(res.idx, idx, rtol=0, atol=0)
    torch.testing.assert_close(res.dists, dists, rtol=1e-12, atol=1e-12)
    pad = idx < 0
    assert (res.knn[pad] == 0).all() and (res.dists[pad] == 0).all()
    assert (res.idx[1, 5:] == -1).all()


def test_ball_query_strict_radius_and_exact_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    # integer grid with radius 1: neighbours at distance exactly 1 are outside (strict <);
    # no slack forces the exact re-scan of rows whose loose candidates run out.
    monkeypatch.setattr(_native, "_SLACK", 0)
    g = torch.Generator().manual_seed(8)
    p2 = torch.randint(0, 3, (1, 60, 3), generator=g).double()
    p1 = torch.randint(0, 3, (1, 10, 3), generator=g).double()
    res = ball_query(p1, p2, K=5, radius=1.0, **NATIVE)
    _, idx = naive_ball_query(p1, p2, K=5, radius=1.0)
    torch.testing.assert_close(res.idx, idx, rtol=0, atol=0)


def test_ball_query_gradients() -> None:
    p1, p2 = _clouds(9, n=1, p1=4, p2=12)
    fn = lambda a, b: ball_query(a, b, K=5, radius=0.6, **NATIVE).dists  # noqa: E731
    assert torch.autograd.gradcheck(fn, (p1.requires_grad_(), p2.requires_grad_()))


# ---------------------------------------------------------------- farthest points
def test_fps_matches_naive_ragged_and_per_cloud_k() -> None:
    points = _clouds(10, n=3, p1=40, dtype=torch.float32)[0]
    lengths = torch.tensor([40, 12, 3])
    sampled, idx = sample_farthest_points(points, lengths, K=[9, 12, 5], **NATIVE)
    expect = naive_fps(points, lengths, K=[9, 12, 5])
    torch.testing.assert_close(idx, expect, rtol=0, atol=0)
    assert sampled.dtype == torch.float32 and sampled.shape == (3, 12, 3)
    assert (idx[0, 9:] == -1).all() and (idx[2, 3:] == -1).all()
    assert (sampled[idx < 0] == 0).all()
    torch.testing.assert_close(sampled[0, :9], points[0, idx[0, :9]])


def test_fps_ties_and_tensor_k() -> None:
    g = torch.Generator().manual_seed(11)
    points = torch.randint(0, 2, (2, 30, 3), generator=g).float()
    _, idx = sample_farthest_points(points, K=torch.tensor([6, 6]), **NATIVE)
    torch.testing.assert_close(idx, naive_fps(points, K=6), rtol=0, atol=0)


def test_fps_random_start_is_seeded() -> None:
    points = _clouds(12, n=2, p1=30, dtype=torch.float32)[0]
    torch.manual_seed(5)
    _, a = sample_farthest_points(points, K=5, random_start_point=True, **NATIVE)
    torch.manual_seed(5)
    _, b = sample_farthest_points(points, K=5, random_start_point=True, **NATIVE)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(a, naive_fps(points, K=5, start=a[:, 0]), rtol=0, atol=0)


def test_fps_gather_is_differentiable() -> None:
    points = _clouds(13, n=1, p1=20, dtype=torch.float32)[0].requires_grad_(True)
    sampled, idx = sample_farthest_points(points, K=4, **NATIVE)
    sampled.sum().backward()
    expect = torch.zeros_like(points)
    expect[0, idx[0]] = 1.0
    torch.testing.assert_close(points.grad, expect)


# ---------------------------------------------------------------- interpolation / grouping
def test_three_nn_and_interpolation() -> None:
    unknown, known = _clouds(14, p1=6, p2=9)
    feats = torch.randn(2, 9, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    d, idx = three_nn(unknown, known, **NATIVE)
    ed, eidx = naive_knn(unknown, known, K=3)
    torch.testing.assert_close(idx, eidx, rtol=0, atol=0)
    torch.testing.assert_close(d, ed)
    out = interpolate_features(unknown, known, feats, **NATIVE)
    for b in range(2):
        for i in range(6):
            w = 1.0 / (ed[b, i].sqrt() + 1e-8)
            w = w / w.sum()
            torch.testing.assert_close(out[b, i], (w[:, None] * feats[b, eidx[b, i]]).sum(0))
    manual = three_interpolate(feats, idx, torch.full((2, 6, 3), 1 / 3, dtype=torch.float64))
    torch.testing.assert_close(manual[0, 0], feats[0, idx[0, 0]].mean(0))


def test_interpolation_with_fewer_known_points_than_three() -> None:
    unknown, known = _clouds(15, p1=4, p2=5)
    feats = torch.randn(2, 5, 2, dtype=torch.float64)
    out = interpolate_features(unknown, known, feats, lengths_known=torch.tensor([5, 1]), **NATIVE)
    torch.testing.assert_close(out[1], feats[1, :1].expand(4, 2))


def test_group_points_zero_for_padding() -> None:
    feats = torch.randn(1, 5, 3)
    idx = torch.tensor([[[4, -1], [0, 2]]])
    out = group_points(feats, idx)
    torch.testing.assert_close(out[0, 0, 0], feats[0, 4])
    assert (out[0, 0, 1] == 0).all()


# ---------------------------------------------------------------- dispatcher
def test_dispatcher_reports_reasons(monkeypatch: pytest.MonkeyPatch) -> None:
    status = backend_status("cpu", torch.float32)
    assert status["native"] is None
    monkeypatch.setattr(
        backends, "_pytorch3d_import_error", lambda: "pytorch3d.ops is not importable (test)"
    )
    assert "not importable" in backend_status()["pytorch3d"]
    assert resolve_backend("auto", torch.device("cpu"), torch.float32) == "native"
    with pytest.raises(PointOpsError, match=r"cannot run: pytorch3d\.ops is not importable"):
        resolve_backend("pytorch3d", torch.device("cpu"), torch.float32)
    with pytest.raises(PointOpsError, match="unknown backend"):
        resolve_backend("cuda-magic", torch.device("cpu"), torch.float32)
    monkeypatch.setenv("EV_POINTS_BACKEND", "native")
    assert resolve_backend(None, torch.device("cpu"), torch.float32) == "native"


def test_pytorch3d_cpu_is_float32_only() -> None:
    reason = backend_status("cpu", torch.float64)["pytorch3d"]
    assert reason is not None
