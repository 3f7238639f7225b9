"""Dtype-aware tolerances (kornia/xformers habits) and a kornia-style base tester."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

# (rtol, atol) per dtype. fp64 is tight: references are exact maths in the same dtype.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-4, 1e-5),
    torch.float16: (1e-3, 4e-3),
    torch.bfloat16: (1.6e-2, 2e-2),
}


def tolerance(dtype: torch.dtype) -> tuple[float, float]:
    """``(rtol, atol)`` for comparing tensors of ``dtype``."""
    try:
        return TOLERANCES[dtype]
    except KeyError:
        raise KeyError(f"no tolerance defined for {dtype}") from None


def assert_close(
    actual: torch.Tensor,
    expected: torch.Tensor,
    *,
    rtol: float | None = None,
    atol: float | None = None,
    msg: str | None = None,
) -> None:
    """``torch.testing.assert_close`` with tolerances chosen from the lower-precision dtype.

    ``expected`` may be computed in a higher precision: it is cast to ``actual``'s dtype.
    """
    dtype = actual.dtype
    r, a = tolerance(dtype) if dtype.is_floating_point else (0.0, 0.0)
    torch.testing.assert_close(
        actual,
        expected.to(dtype=dtype, device=actual.device),
        rtol=r if rtol is None else rtol,
        atol=a if atol is None else atol,
        msg=msg,
    )


class BaseTester:
    """Base class for op/layer tests: dtype tolerances and fp64 gradcheck."""

    assert_close = staticmethod(assert_close)

    @staticmethod
    def gradcheck(
        fn: Callable[..., Any],
        inputs: Sequence[torch.Tensor],
        *,
        eps: float = 1e-6,
        atol: float = 1e-5,
        rtol: float = 1e-3,
        **kwargs: Any,
    ) -> bool:
        """``torch.autograd.gradcheck`` in float64; floating inputs are cast and require grad."""
        prepared = tuple(
            t.detach().double().requires_grad_(True) if t.is_floating_point() else t for t in inputs
        )
        return bool(torch.autograd.gradcheck(fn, prepared, eps=eps, atol=atol, rtol=rtol, **kwargs))
