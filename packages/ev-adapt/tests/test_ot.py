"""Unbalanced Sinkhorn: agreement with POT, marginals, stability, batching."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ev_adapt.ot import sinkhorn_unbalanced

ot = pytest.importorskip("ot", reason="POT (test dependency) is not installed")


def _problem(n: int, m: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(n, generator=g, dtype=torch.float64) + 0.1
    b = torch.rand(m, generator=g, dtype=torch.float64) + 0.1
    M = torch.rand(n, m, generator=g, dtype=torch.float64)
    return a / a.sum(), b / b.sum(), M


@pytest.mark.parametrize("stabilized", [True, False])
@pytest.mark.parametrize(("reg", "reg_m"), [(1.0, 1.0), (0.1, 1.0), (0.5, 10.0)])
def test_equals_pot_float64(stabilized: bool, reg: float, reg_m: float) -> None:
    a, b, M = _problem(7, 11, seed=int(reg * 10 + reg_m))
    ref = ot.unbalanced.sinkhorn_unbalanced(
        a.numpy(), b.numpy(), M.numpy(), reg, reg_m, numItermax=500, stopThr=0.0
    )
    plan = sinkhorn_unbalanced(a, b, M, reg, reg_m, num_iters=500, stabilized=stabilized, tol=0.0)
    np.testing.assert_allclose(plan.numpy(), ref, rtol=1e-6, atol=1e-9)


def test_equals_pot_with_default_stopping() -> None:
    a, b, M = _problem(10, 48, seed=3)
    ref = ot.unbalanced.sinkhorn_unbalanced(a.numpy(), b.numpy(), M.numpy(), 1.0, 1.0)
    plan = sinkhorn_unbalanced(a, b, M, 1.0, 1.0)
    np.testing.assert_allclose(plan.numpy(), ref, atol=1e-6)


def test_marginals_approach_balanced_as_reg_m_grows() -> None:
    a, b, M = _problem(6, 9, seed=1)
    plan = sinkhorn_unbalanced(a, b, M, 0.2, 1e4, num_iters=5000, tol=1e-12)
    torch.testing.assert_close(plan.sum(1), a, atol=1e-4, rtol=0)
    torch.testing.assert_close(plan.sum(0), b, atol=1e-4, rtol=0)
    # against the balanced solver as the τ → ∞ limit
    ref = ot.sinkhorn(a.numpy(), b.numpy(), M.numpy(), 0.2, numItermax=5000, stopThr=1e-12)
    np.testing.assert_allclose(plan.numpy(), ref, atol=1e-4)


def test_log_domain_survives_tiny_reg() -> None:
    a, b, M = _problem(5, 8, seed=2)
    M = M * 50  # exp(-M/reg) underflows for the scaling form
    plan = sinkhorn_unbalanced(a, b, M, 0.01, 1.0, num_iters=200)
    assert torch.isfinite(plan).all() and plan.sum() > 0
    plain = sinkhorn_unbalanced(a, b, M, 0.01, 1.0, num_iters=200, stabilized=False)
    assert not torch.isfinite(plain).all() or plain.sum() == 0  # what stabilisation avoids


def test_batched_equals_one_by_one() -> None:
    problems = [_problem(4, 6, seed=s) for s in range(3)]
    a = torch.stack([p[0] for p in problems])
    b = torch.stack([p[1] for p in problems])
    M = torch.stack([p[2] for p in problems])
    batched = sinkhorn_unbalanced(a, b, M, 0.5, 1.0, num_iters=300, tol=0.0)
    for i, (ai, bi, Mi) in enumerate(problems):
        single = sinkhorn_unbalanced(ai, bi, Mi, 0.5, 1.0, num_iters=300, tol=0.0)
        torch.testing.assert_close(batched[i], single, rtol=1e-12, atol=1e-15)


def test_bad_shapes_and_params() -> None:
    a, b, M = _problem(3, 4, seed=0)
    with pytest.raises(ValueError, match="must match"):
        sinkhorn_unbalanced(a, b[:3], M, 1.0, 1.0)
    with pytest.raises(ValueError, match="> 0"):
        sinkhorn_unbalanced(a, b, M, 0.0, 1.0)
