"""Reproducibility: seeding and the resolved run config dumped beside a run's outputs."""

from __future__ import annotations

import os
import platform
import random
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ev_core.io import to_jsonable, write_json

__all__ = ["dump_run_config", "environment_info", "git_sha", "seed_everything"]


def seed_everything(seed: int, *, deterministic: bool = False) -> int:
    """Seed Python, NumPy and torch (all devices); optionally request deterministic kernels.

    Args:
        seed: the seed; must fit in 32 bits (NumPy's limit).
        deterministic: also call ``torch.use_deterministic_algorithms(True)`` and turn off
            cuDNN benchmarking (slower, bit-reproducible where PyTorch supports it). cuBLAS
            reads ``CUBLAS_WORKSPACE_CONFIG`` when CUDA initialises: it is set here if CUDA
            is not initialised yet, and a warning is given otherwise.

    ``PYTHONHASHSEED`` only affects a new interpreter, so it is not set here: export it
    before starting Python if ``hash()``-ordered code must be reproducible.

    Returns:
        The seed, so that it can be logged.
    """
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed must be in [0, 2**32), got {seed}")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device
    if deterministic:
        if "CUBLAS_WORKSPACE_CONFIG" not in os.environ:
            if torch.cuda.is_initialized():
                warnings.warn(
                    "CUDA is already initialised: set CUBLAS_WORKSPACE_CONFIG=:4096:8 before "
                    "the first CUDA call for deterministic cuBLAS",
                    stacklevel=2,
                )
            else:
                os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    return seed


def git_sha(cwd: str | os.PathLike[str] | None = None) -> str | None:
    """The current git commit of ``cwd`` (default: the working directory), or ``None``."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def environment_info() -> dict[str, Any]:
    """Versions and hardware that decide numerics and speed (for configs and benchmarks)."""
    from importlib.metadata import distributions

    ev_versions = {
        d.metadata["Name"]: d.version
        for d in distributions()
        if (d.metadata["Name"] or "").lower().startswith("ev-")
    }
    info: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "num_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "git_sha": git_sha(),
        "ev_packages": dict(sorted(ev_versions.items())),
    }
    return info


def dump_run_config(
    config: Any, out_dir: str | os.PathLike[str], name: str = "config.json"
) -> Path:
    """Write the resolved run config (plus the environment) as JSON into ``out_dir``.

    Args:
        config: dataclass or mapping with every setting the run actually used.
        out_dir: the run's output folder (created if needed).
        name: file name inside ``out_dir``.

    Returns:
        The path written.
    """
    return write_json(
        Path(out_dir) / name, {"config": to_jsonable(config), "environment": environment_info()}
    )
