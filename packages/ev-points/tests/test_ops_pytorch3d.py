"""The native backend against pytorch3d itself (skipped, with the reason, without pytorch3d).

Random float32 clouds have no exact distance ties, so indices must agree exactly; distances
to 1e-5 and gradients with the float32 tolerances. The kd-tree path (large clouds) computes
its distances with pytorch3d's float32 arithmetic: they must be bit-identical, ties included.
"""

from __future__ import annotations

import pytest
import torch

from ev_points.ops import (
    _native,
    backend_status,
    ball_query,
    knn_points,
    sample_farthest_points,
)

_REASON = backend_status("cpu", torch.float32)["pytorch3d"]
pytestmark = pytest.mark.skipif(
    _REASON is not None, reason=f"pytorch3d backend unavailable: {_REASON}"
)


def _clouds(seed: int, n: int, p1: int, p2: int):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, p1, 3, generator=g) * 4 - 2, torch.rand(n, p2, 3, generator=g) * 4 - 2


def _grads(fn, p1, p2, out_field="dists"):
    a, b = p1.clone().requires_grad_(True), p2.clone().requires_grad_(True)
    res = fn(a, b)
    w = torch.linspace(-1, 1, res.dists.numel()).reshape(res.dists.shape)
    loss = (res.dists * w).sum() + (res.knn.sum() if res.knn is not None else 0.0)
    ga, gb = torch.autograd.grad(loss, (a, b))
    return res, ga, gb


@pytest.mark.parametrize("norm", [1, 2])
@pytest.mark.parametrize(
    ("K", "lengths"), [(1, None), (8, None), (8, ([300, 120, 7], [250, 5, 90]))]
)
def test_knn_equals_pytorch3d(norm: int, K: int, lengths) -> None:
    p1, p2 = _clouds(K + norm, 3, 300, 250)
    l1, l2 = (
        (None, None) if lengths is None else (torch.tensor(lengths[0]), torch.tensor(lengths[1]))
    )

    def run(backend):
        return lambda a, b: knn_points(
            a, b, l1, l2, norm=norm, K=K, return_nn=True, backend=backend
        )

    ours, ga, gb = _grads(run("native"), p1, p2)
    ref, ra, rb = _grads(run("pytorch3d"), p1, p2)
    torch.testing.assert_close(ours.idx, ref.idx, rtol=0, atol=0)
    torch.testing.assert_close(ours.dists, ref.dists, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.knn, ref.knn, rtol=0, atol=0)
    torch.testing.assert_close(ga, ra, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gb, rb, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("K", [4, 40])
def test_ball_query_equals_pytorch3d(K: int) -> None:
    p1, p2 = _clouds(K, 2, 200, 400)
    l1, l2 = torch.tensor([200, 50]), torch.tensor([400, 33])

    def run(backend):
        return lambda a, b: ball_query(a, b, l1, l2, K=K, radius=0.7, backend=backend)

    ours, ga, gb = _grads(run("native"), p1, p2)
    ref, ra, rb = _grads(run("pytorch3d"), p1, p2)
    torch.testing.assert_close(ours.idx, ref.idx, rtol=0, atol=0)
    torch.testing.assert_close(ours.dists, ref.dists, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.knn, ref.knn, rtol=0, atol=0)
    torch.testing.assert_close(ga, ra, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gb, rb, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("K", [64, [10, 64, 3], torch.tensor([5, 1, 70])])
def test_fps_equals_pytorch3d(K) -> None:
    points = _clouds(0, 3, 500, 1)[0]
    lengths = torch.tensor([500, 200, 60])
    ours = sample_farthest_points(points, lengths, K=K, backend="native")
    ref = sample_farthest_points(points, lengths, K=K, backend="pytorch3d")
    torch.testing.assert_close(ours[1], ref[1], rtol=0, atol=0)
    torch.testing.assert_close(ours[0], ref[0], rtol=0, atol=0)


# ---------------------------------------------------------------- the kd-tree path (large clouds)
def _kd_clouds(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    p1, p2 = _clouds(seed, 3, 600, 700)
    p2[1, :300] = torch.randint(0, 5, (300, 3)).float() * 0.25  # exact ties and duplicates
    p1[1, :100] = p2[1, :100]
    return p1, p2


@pytest.mark.parametrize("norm", [1, 2])
def test_knn_kdtree_path_equals_pytorch3d(norm: int) -> None:
    p1, p2 = _kd_clouds(norm)
    assert _native.selection_path(p1, p2)[0] == "kdtree"
    l1, l2 = torch.tensor([600, 550, 7]), torch.tensor([700, 650, 12])

    def run(backend):
        return lambda a, b: knn_points(
            a, b, l1, l2, norm=norm, K=16, return_nn=True, return_sorted=False, backend=backend
        )

    ours, ga, gb = _grads(run("native"), p1, p2)
    ref, ra, rb = _grads(run("pytorch3d"), p1, p2)
    # pytorch3d's kernel order (return_sorted=False) is (distance, index): identical
    torch.testing.assert_close(ours.idx, ref.idx, rtol=0, atol=0)
    torch.testing.assert_close(ours.dists, ref.dists, rtol=0, atol=0)
    torch.testing.assert_close(ours.knn, ref.knn, rtol=0, atol=0)
    torch.testing.assert_close(ga, ra, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gb, rb, rtol=1e-4, atol=1e-4)


# about 0.05, 6 and 150 uniform points per ball (the pair route, then per-row fetches and
# early-stopping scans); radius 0.5 also puts grid points exactly on the sphere in cloud 1
@pytest.mark.parametrize("radius", [0.1, 0.5, 1.5])
def test_ball_query_kdtree_path_equals_pytorch3d(radius: float) -> None:
    p1, p2 = _kd_clouds(3)
    assert _native.selection_path(p1, p2)[0] == "kdtree"
    l1, l2 = torch.tensor([600, 550, 7]), torch.tensor([700, 650, 12])

    def run(backend):
        return lambda a, b: ball_query(a, b, l1, l2, K=16, radius=radius, backend=backend)

    ours, ga, gb = _grads(run("native"), p1, p2)
    ref, ra, rb = _grads(run("pytorch3d"), p1, p2)
    torch.testing.assert_close(ours.idx, ref.idx, rtol=0, atol=0)
    torch.testing.assert_close(ours.dists, ref.dists, rtol=0, atol=0)
    torch.testing.assert_close(ours.knn, ref.knn, rtol=0, atol=0)
    torch.testing.assert_close(ga, ra, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gb, rb, rtol=1e-4, atol=1e-4)
