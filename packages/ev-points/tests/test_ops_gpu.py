"""The native and Triton backends on CUDA give the CPU results (skipped, with the reason,
without CUDA)."""

from __future__ import annotations

import pytest
import torch

from ev_points.ops import ball_query, knn_points, sample_farthest_points

pytestmark = pytest.mark.gpu


def _clouds():
    g = torch.Generator().manual_seed(0)
    return torch.rand(3, 700, 3, generator=g), torch.rand(3, 900, 3, generator=g)


def test_knn_and_ball_query_cuda_equal_cpu() -> None:
    p1, p2 = _clouds()
    l1, l2 = torch.tensor([700, 300, 5]), torch.tensor([900, 10, 400])
    for fn in (
        lambda a, b, x, y: knn_points(a, b, x, y, K=12, backend="native"),
        lambda a, b, x, y: ball_query(a, b, x, y, K=12, radius=0.1, backend="native"),
    ):
        cpu = fn(p1, p2, l1, l2)
        gpu = fn(p1.cuda(), p2.cuda(), l1.cuda(), l2.cuda())
        torch.testing.assert_close(gpu.idx.cpu(), cpu.idx, rtol=0, atol=0)
        torch.testing.assert_close(gpu.dists.cpu(), cpu.dists, rtol=1e-5, atol=1e-6)


def test_fps_cuda_equals_cpu() -> None:
    points = _clouds()[1]
    lengths = torch.tensor([900, 50, 400])
    cpu = sample_farthest_points(points, lengths, K=[200, 60, 100], backend="native")
    gpu = sample_farthest_points(points.cuda(), lengths.cuda(), K=[200, 60, 100], backend="native")
    torch.testing.assert_close(gpu[1].cpu(), cpu[1], rtol=0, atol=0)


@pytest.mark.parametrize("norm", [1, 2])
def test_triton_knn_and_ball_query_equal_cpu(norm: int) -> None:
    """The Triton kernels on the GPU make the CPU's float32 decisions: identical indices
    (ties included, on a grid), distances and gradients."""
    pytest.importorskip("triton")
    p1, p2 = _clouds()
    p2[1, :400] = torch.randint(0, 6, (400, 3)).float() * 0.1  # exact ties and duplicates
    l1, l2 = torch.tensor([700, 300, 5]), torch.tensor([900, 600, 400])
    runs = (
        lambda a, b, x, y, be: knn_points(a, b, x, y, norm=norm, K=20, return_nn=True, backend=be),
        lambda a, b, x, y, be: ball_query(a, b, x, y, K=20, radius=0.1, backend=be),
    )
    for fn in runs:
        a, b = p1.clone().requires_grad_(True), p2.clone().requires_grad_(True)
        cpu = fn(a, b, l1, l2, "native")
        ga, gb = torch.autograd.grad(cpu.dists.sum() + cpu.knn.sum(), (a, b))
        a2, b2 = p1.cuda().requires_grad_(True), p2.cuda().requires_grad_(True)
        gpu = fn(a2, b2, l1.cuda(), l2.cuda(), "triton")
        ga2, gb2 = torch.autograd.grad(gpu.dists.sum() + gpu.knn.sum(), (a2, b2))
        torch.testing.assert_close(gpu.idx.cpu(), cpu.idx, rtol=0, atol=0)
        torch.testing.assert_close(gpu.dists.cpu(), cpu.dists, rtol=0, atol=0)
        torch.testing.assert_close(ga2.cpu(), ga, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(gb2.cpu(), gb, rtol=1e-5, atol=1e-5)


def test_triton_fps_equals_cpu() -> None:
    pytest.importorskip("triton")
    points = _clouds()[1]
    lengths = torch.tensor([900, 50, 400])
    cpu = sample_farthest_points(points, lengths, K=[200, 60, 100], backend="native")
    gpu = sample_farthest_points(points.cuda(), lengths.cuda(), K=[200, 60, 100], backend="triton")
    torch.testing.assert_close(gpu[1].cpu(), cpu[1], rtol=0, atol=0)
    torch.testing.assert_close(gpu[0].cpu(), cpu[0], rtol=0, atol=0)
