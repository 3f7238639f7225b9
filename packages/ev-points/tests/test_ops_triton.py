"""The ``triton`` backend: the dispatcher's reasons, and the kernels' logic in Triton's
interpreter (``TRITON_INTERPRET=1``, CPU tensors, tiny shapes, tiles small enough that every
loop runs several times) against the native backend and the naive references. The same
kernels on a real GPU are checked in ``test_ops_gpu.py``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ev_points.ops import PointOpsError, _triton, backend_status, backends, resolve_backend


def test_triton_reasons(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cpu, f32 = torch.device("cpu"), torch.float32
    why = backend_status(cpu, f32)["triton"]
    assert why is not None and ("CUDA" in why or "not importable" in why)
    if _triton._import_error() is None:
        assert "TRITON_INTERPRET" in why
        assert "float32" in backend_status("cuda", torch.float64)["triton"]
        assert backend_status("cuda", f32)["triton"] is None
    with pytest.raises(PointOpsError, match="'triton' cannot run"):
        resolve_backend("triton", cpu, f32)
    monkeypatch.setattr(_triton, "_import_error", lambda: "triton is not importable (test)")
    assert backend_status("cuda", f32)["triton"] == "triton is not importable (test)"
    # not measured on a GPU yet: auto never takes it
    monkeypatch.setattr(_triton, "_import_error", lambda: None)
    monkeypatch.setattr(backends, "_pytorch3d_import_error", lambda: "absent (test)")
    assert resolve_backend("auto", torch.device("cuda"), f32) == "native"


_SCRIPT = r"""
import torch
from points_reference import naive_ball_query, naive_fps, naive_knn
from ev_points.ops import _triton, backend_status, ball_query, knn_points, sample_farthest_points

assert backend_status("cpu", torch.float32)["triton"] is None  # the interpreter runs CPU tensors
_triton.BLOCK_ROWS, _triton.BLOCK_POINTS, _triton.BLOCK_FPS = 8, 16, 16  # several tiles each
g = torch.Generator().manual_seed(0)
rand = (torch.rand(2, 20, 3, generator=g), torch.rand(2, 45, 3, generator=g))
grid = (torch.randint(0, 3, (2, 20, 3), generator=g).float(),
        torch.randint(0, 3, (2, 45, 3), generator=g).float())  # exact ties, duplicates
l1, l2 = torch.tensor([20, 10]), torch.tensor([45, 5])


def same(a, b):
    assert torch.equal(a, b), (a != b).nonzero()[:5]


def grads(run, p1, p2):
    a, b = p1.clone().requires_grad_(True), p2.clone().requires_grad_(True)
    res = run(a, b)
    w = torch.linspace(-1, 1, res.dists.numel()).reshape(res.dists.shape)
    return res, torch.autograd.grad((res.dists * w).sum() + res.knn.sum(), (a, b))


def check(op, p1, p2, **kw):
    ours, g_ours = grads(lambda a, b: op(a, b, l1, l2, backend="triton", **kw), p1, p2)
    ref, g_ref = grads(lambda a, b: op(a, b, l1, l2, backend="native", **kw), p1, p2)
    for x, y in zip((ours.idx, ours.dists, ours.knn, *g_ours), (ref.idx, ref.dists, ref.knn, *g_ref)):
        same(x, y)
    return ours.idx


# k-NN: one tile merge per tile (K=5: 16-wide tiles; K=20: 32-wide, K beyond cloud 1's 5 points)
check(knn_points, *rand, norm=2, K=5, return_nn=True)
idx = check(knn_points, *grid, norm=1, K=20, return_nn=True)
same(idx, naive_knn(grid[0].double(), grid[1].double(), l1, l2, K=20, norm=1)[1])
# ball query: early stop, K beyond the hits, neighbours exactly on the radius (grid, r = 1)
for p1, p2, K, radius in ((*rand, 4, 0.3), (*rand, 30, 0.6), (*grid, 4, 1.0), (*grid, 30, 1.5)):
    idx = check(ball_query, p1, p2, K=K, radius=radius)
    if p1 is grid[0]:  # integer coordinates: exact in float32, the naive answer holds
        same(idx, naive_ball_query(p1.double(), p2.double(), l1, l2, K=K, radius=radius)[1])

lengths = torch.tensor([45, 12])
for points, K in ((rand[1], [20, 12]), (grid[1], torch.tensor([45, 3]))):
    ours = sample_farthest_points(points, lengths, K=K, backend="triton")
    ref = sample_farthest_points(points, lengths, K=K, backend="native")
    same(ours[1], ref[1])
    same(ours[0], ref[0])
    same(ours[1], naive_fps(points, lengths, K=list(K)))
torch.manual_seed(3)
a = sample_farthest_points(rand[1], lengths, K=9, random_start_point=True, backend="triton")
torch.manual_seed(3)
b = sample_farthest_points(rand[1], lengths, K=9, random_start_point=True, backend="native")
same(a[1], b[1])
print("ok")
"""


def test_triton_kernels_in_the_interpreter() -> None:
    """k-NN (both norms, K beyond the cloud, ragged and empty rows), ball query (points on the
    radius, early stop) and FPS (per-cloud K, random start) through ``backend="triton"``:
    indices, distances and gradients identical to the native backend, indices to the naive
    references where float32 is exact."""
    pytest.importorskip("triton")
    env = {
        **os.environ,
        "TRITON_INTERPRET": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(
            [str(Path(__file__).parent), *filter(None, [os.environ.get("PYTHONPATH")])]
        ),
    }
    res = subprocess.run(
        [sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, timeout=600
    )
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]
