"""pytest plugin loaded automatically in every ev test session (entry point ``pytest11``).

* ``@pytest.mark.gpu`` tests are skipped, with the reason, when CUDA is not available.
* ``slow`` and ``distributed`` markers are registered.
* ``restore_rng`` fixture: saves Python, NumPy and torch RNG states and restores them.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import numpy as np
import pytest
import torch


def pytest_configure(config: pytest.Config) -> None:
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
