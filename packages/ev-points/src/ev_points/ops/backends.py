"""One dispatcher for the point ops' backends, saying why a backend cannot run.

Backends, in the order ``"auto"`` tries them:

* ``"pytorch3d"`` -- ``pytorch3d.ops`` when it is importable (optional; never required);
* ``"native"`` -- vectorised, chunked PyTorch (:mod:`ev_points.ops._native`); always available.

``backend=None`` means the environment variable ``EV_POINTS_BACKEND`` or, unset, ``"auto"``.
"""

from __future__ import annotations

import functools
import importlib
import os
from typing import Any

import torch

from ev_points.ops._common import PointOpsError

__all__ = ["BACKENDS", "backend_status", "resolve_backend"]

BACKENDS = ("pytorch3d", "native")


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
    return f"unknown backend {name!r} (choose from {', '.join(BACKENDS)}, or 'auto')"


def backend_status(
    device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> dict[str, str | None]:
    """For each backend, ``None`` when it can run on ``device``/``dtype``, else the reason."""
    dev = torch.device(device) if device is not None else None
    return {name: _unavailable(name, dev, dtype) for name in BACKENDS}


def resolve_backend(backend: str | None, device: torch.device, dtype: torch.dtype) -> str:
    """The backend that will run for inputs on ``device`` with ``dtype``.

    Args:
        backend: ``"auto"``, ``"pytorch3d"``, ``"native"``, or None (``EV_POINTS_BACKEND``,
            default ``"auto"``).

    Raises:
        PointOpsError: the requested backend cannot run; the message gives the reason.
    """
    name = (backend or os.environ.get("EV_POINTS_BACKEND", "") or "auto").strip().lower()
    if name == "auto":
        for candidate in BACKENDS:
            if _unavailable(candidate, device, dtype) is None:
                return candidate
        raise AssertionError("the native backend is always available")  # pragma: no cover
    why = _unavailable(name, device, dtype)
    if why is not None:
        raise PointOpsError(f"point-ops backend {name!r} cannot run: {why}")
    return name


def pytorch3d_ops() -> Any:
    """The ``pytorch3d.ops`` module (call only after :func:`resolve_backend` chose it)."""
    return importlib.import_module("pytorch3d.ops")
