"""One dispatcher for the point ops' backends, saying why a backend cannot run.

Backends:

* ``"native"`` -- ev-points' own implementation (:mod:`ev_points.ops._native`); always
  available. On the CPU (float32/float64 point clouds of a few hundred points and more) k-NN
  and ball query select neighbours with a kd-tree (``scipy.spatial.cKDTree``); elsewhere, or
  when :func:`kdtree_status` gives a reason, with chunked brute force in torch.
* ``"pytorch3d"`` -- ``pytorch3d.ops`` when it is importable (optional; never required).
* ``"triton"`` -- Triton kernels (:mod:`ev_points.ops._triton`) on CUDA, float32 k-NN / ball
  query (FPS computes in float32 for any input); Triton is optional. Not yet measured on a GPU,
  so ``auto`` never picks it: ask for it with ``backend="triton"`` or ``EV_POINTS_BACKEND``.

``"auto"`` takes the backend measured fastest for the call (BENCHMARKS.md, CPU, batch 8):

* CPU: ``native`` -- except that when pytorch3d can run, its C++ loops win on small inputs:
  k-NN where native would not use its kd-tree, ball query below ``P1·P2 = 2²²`` (~2k × 2k
  points), farthest-point sampling below ``N·P = 16384`` points per batch;
* CUDA: ``pytorch3d`` when importable (its CUDA kernels), else ``native`` (brute force in torch);
  ``triton`` only on request until it is measured.

``backend=None`` means the environment variable ``EV_POINTS_BACKEND`` or, unset, ``"auto"``.
"""

from __future__ import annotations

import functools
import importlib
import os
from typing import Any

import torch

from ev_points.ops import _kdtree, _triton
from ev_points.ops._common import PointOpsError

__all__ = ["BACKENDS", "backend_status", "kdtree_status", "resolve_backend"]

BACKENDS = ("native", "pytorch3d", "triton")

#: Per op, the smallest problem for which ``auto`` prefers native over pytorch3d on the CPU
#: (``P1 * P2`` for k-NN and ball query, ``N * P`` for farthest-point sampling, whose native
#: steps are vectorised over the batch). k-NN and ball query also need native's kd-tree path
#: (:func:`ev_points.ops._native.selection_path`).
CPU_NATIVE_FROM = {"knn_points": _kdtree.MIN_PAIRS, "ball_query": 1 << 22, "fps": 1 << 14}


@functools.cache
def _pytorch3d_import_error() -> str | None:
    try:
        importlib.import_module("pytorch3d.ops")
    except Exception as exc:  # ImportError, or a binary built for another torch
        return f"pytorch3d.ops is not importable ({type(exc).__name__}: {exc})"
    return None


def _unavailable(name: str, device: torch.device | None, dtype: torch.dtype | None) -> str | None:
    """Why backend ``name`` cannot run on ``device`` / ``dtype`` (None when it can)."""
    if name == "native":
        return None
    if name == "pytorch3d":
        why = _pytorch3d_import_error()
        if why is not None:
            return why
        if device is not None and device.type not in ("cpu", "cuda"):
            return f"pytorch3d has no kernels for device type {device.type!r}"
        if (
            dtype is not None
            and device is not None
            and device.type == "cpu"
            and dtype != torch.float32
        ):
            return f"pytorch3d's CPU kernels support float32 only, got {dtype}"
        return None
    if name == "triton":
        return _triton.unavailable(device, dtype)
    return f"unknown backend {name!r} (choose from {', '.join(BACKENDS)}, or 'auto')"


def backend_status(
    device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> dict[str, str | None]:
    """For each backend, ``None`` when it can run on ``device``/``dtype``, else the reason."""
    dev = torch.device(device) if device is not None else None
    return {name: _unavailable(name, dev, dtype) for name in BACKENDS}


def kdtree_status(
    device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> str | None:
    """``None`` when the native backend selects k-NN / ball-query neighbours with its kd-tree
    on ``device``/``dtype`` (for point clouds, D <= 3, large enough to pay), else why it uses
    brute force instead (not the CPU, a half dtype, scipy not importable)."""
    return _kdtree.unavailable(torch.device(device), dtype)


def _auto(
    device: torch.device, dtype: torch.dtype, op: str | None, shape: tuple[int, ...] | None
) -> str:
    p3d = _unavailable("pytorch3d", device, dtype) is None
    if device.type != "cpu":
        return "pytorch3d" if p3d else "native"
    if not p3d or op is None or shape is None:
        return "native"
    if op == "fps":
        return "native" if shape[0] * shape[1] >= CPU_NATIVE_FROM["fps"] else "pytorch3d"
    p1, p2, d = shape
    tree = _kdtree.unavailable(device, dtype) is None and _kdtree.worthwhile_shape(p1, p2, d)
    return "native" if tree and p1 * p2 >= CPU_NATIVE_FROM[op] else "pytorch3d"


def resolve_backend(
    backend: str | None,
    device: torch.device,
    dtype: torch.dtype,
    *,
    op: str | None = None,
    shape: tuple[int, ...] | None = None,
) -> str:
    """The backend that will run for inputs on ``device`` with ``dtype``.

    Args:
        backend: ``"auto"``, ``"native"``, ``"pytorch3d"``, ``"triton"``, or None
            (``EV_POINTS_BACKEND``, default ``"auto"``).
        op: ``"knn_points"``, ``"ball_query"`` or ``"fps"``, with ``shape`` = ``(P1, P2, D)``
            (``(N, P)`` for fps): lets ``auto`` pick by problem size; without them ``auto``
            assumes a large problem.

    Raises:
        PointOpsError: the requested backend cannot run; the message gives the reason.
    """
    name = (backend or os.environ.get("EV_POINTS_BACKEND", "") or "auto").strip().lower()
    if name == "auto":
        return _auto(device, dtype, op, shape)
    why = _unavailable(name, device, dtype)
    if why is not None:
        raise PointOpsError(f"point-ops backend {name!r} cannot run: {why}")
    return name


def pytorch3d_ops() -> Any:
    """The ``pytorch3d.ops`` module (call only after :func:`resolve_backend` chose it)."""
    return importlib.import_module("pytorch3d.ops")
