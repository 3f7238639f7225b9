"""ev-testing's own checks: tolerances bite, the reference attention is right."""

import pytest
import torch

from ev_testing import BaseTester, assert_close, tolerance
from ev_testing.reference import naive_attention


def test_tolerance_table_orders_dtypes() -> None:
    assert tolerance(torch.float64)[1] < tolerance(torch.float32)[1] < tolerance(torch.bfloat16)[1]
    with pytest.raises(KeyError):
        tolerance(torch.int8)


def test_assert_close_rejects_outside_tolerance() -> None:
    x = torch.ones(4, dtype=torch.float32)
    assert_close(x + 1e-7, x)
    with pytest.raises(AssertionError):
        assert_close(x + 1e-2, x)


def test_naive_attention_uniform_keys_average_values() -> None:
    q = torch.randn(2, 3, 4, dtype=torch.float64)
    k = torch.zeros(2, 5, 4, dtype=torch.float64)  # equal logits -> uniform weights
    v = torch.randn(2, 5, 6, dtype=torch.float64)
    out = naive_attention(q, k, v)
    torch.testing.assert_close(out, v.mean(dim=1, keepdim=True).expand(2, 3, 6))


def test_naive_attention_mask_selects_single_key() -> None:
    q, k, v = (torch.randn(1, 2, 3, dtype=torch.float64) for _ in range(3))
    mask = torch.tensor([[[True, False], [False, True]]])
    torch.testing.assert_close(naive_attention(q, k, v, mask=mask), v)


def test_gradcheck_helper_detects_wrong_gradient() -> None:
    class Wrong(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):  # type: ignore[no-untyped-def]
            return x * 2

        @staticmethod
        def backward(ctx, g):  # type: ignore[no-untyped-def]
            return g * 3

    assert BaseTester.gradcheck(lambda x: x * 2, [torch.randn(3)])
    with pytest.raises(RuntimeError):
        BaseTester.gradcheck(Wrong.apply, [torch.randn(3)])
