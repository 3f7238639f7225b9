"""pytest plugin loaded automatically in every ev test session (entry point ``pytest11``).

* ``@pytest.mark.gpu`` tests are skipped, with the reason, when CUDA is not available.
* ``slow`` and ``distributed`` markers are registered.
* ``restore_rng`` fixture: saves Python, NumPy and torch RNG states and restores them.
* ``EV_FORBIDDEN_PATHS`` (``os.pathsep``-separated folders): any attempt of a test to open or
  list a path inside them fails with ``PermissionError``. The noxfile sets it to the
  ``../shared`` folder beside the repository, so that a test that would need material a
  user's clone does not have fails in CI instead of passing there.
"""

from __future__ import annotations

import os
import random
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

_FORBIDDEN_EVENTS = {"open", "os.listdir", "os.scandir", "os.chdir"}


def _forbid_reads(folders: list[Path]) -> None:
    roots = [str(f.resolve()) for f in folders]

    def hook(event: str, args: tuple[Any, ...]) -> None:
        if event not in _FORBIDDEN_EVENTS or not args:
            return
        target = args[0]
        if not isinstance(target, (str, bytes, os.PathLike)):
            return  # file descriptors
        path = os.fsdecode(target)
        if not os.path.isabs(path):
            path = os.path.join(os.getcwd(), path)
        path = os.path.normpath(path)
        for root in roots:
            if path == root or path.startswith(root + os.sep):
                raise PermissionError(
                    f"a test tried to read {path}, inside {root}, which a user's clone does "
                    "not have: copy what the test needs into the repository"
                )

    sys.addaudithook(hook)


def pytest_configure(config: pytest.Config) -> None:
    forbidden = [Path(p) for p in os.environ.get("EV_FORBIDDEN_PATHS", "").split(os.pathsep) if p]
    if forbidden:
        _forbid_reads(forbidden)
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")
    config.addinivalue_line("markers", "slow: takes more than a few seconds on 2 CPU cores")
    config.addinivalue_line("markers", "distributed: spawns torch.distributed gloo workers")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    reason = "needs CUDA: torch.cuda.is_available() is False on this machine"
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def restore_rng() -> Iterator[None]:
    """Restore Python, NumPy and torch (CPU and CUDA) RNG states after the test."""
    py_state = random.getstate()
    np_state = np.random.get_state()
    torch_state = torch.random.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.random.set_rng_state(torch_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)
