"""Ops beyond the classic Mesa list: each is compressed (or, for linear pools, needs nothing),
keeps the forward bit-identical, and its gradients stay close to the plain op's."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ev_compress import mesa


class Call(nn.Module):
    def __init__(self, fn: Callable[..., Tensor], *params: Tensor) -> None:
        super().__init__()
        self.fn = fn
        self.ps = nn.ParameterList(nn.Parameter(p) for p in params)

    def forward(self, *args: Tensor) -> Tensor:
        return self.fn(*args, *self.ps)


def _compare(
    module: nn.Module, inputs: list[Tensor], seed: int = 0
) -> tuple[float, int, int, mesa.MesaSummary]:
    """(max relative gradient error, baseline saved bytes, Mesa saved bytes, summary)."""
    conv = mesa.convert(copy.deepcopy(module), mesa.MesaPolicy(exclude=()))
    xs_ref = [x.clone().requires_grad_() for x in inputs]
    xs_mesa = [x.clone().requires_grad_() for x in inputs]
    torch.manual_seed(seed)
    with mesa.SavedTensorMeter(module.parameters()) as m_ref:
        out_ref = module(*xs_ref)
    torch.manual_seed(seed)
    with mesa.SavedTensorMeter(conv.parameters()) as m_mesa:
        out_mesa = conv(*xs_mesa)
    assert torch.equal(out_ref, out_mesa), "forward is not bit-identical"
    g = torch.randn(out_ref.shape, generator=torch.Generator().manual_seed(seed + 1))
    out_ref.backward(g)
    out_mesa.backward(g)
    pairs = [(a.grad, b.grad) for a, b in zip(xs_ref, xs_mesa, strict=True)]
    pairs += [(p.grad, q.grad) for p, q in zip(module.parameters(), conv.parameters(), strict=True)]
    err = max(float((a - b).double().norm() / a.double().norm()) for a, b in pairs)
    return err, m_ref.total_bytes, m_mesa.total_bytes, mesa.summary(conv)


CASES: dict[str, tuple[Callable[[], nn.Module], Callable[[], list[Tensor]], str]] = {
    "einsum": (
        lambda: Call(lambda q, k: torch.einsum("bhnd,bhmd->bhnm", q, k)),
        lambda: [torch.randn(2, 3, 32, 24), torch.randn(2, 3, 32, 24)],
        "einsum",
    ),
    "broadcast_matmul": (
        lambda: Call(lambda x, w: x @ w, torch.randn(32, 48)),
        lambda: [torch.randn(4, 64, 32)],
        "matmul",
    ),
    "addmm": (
        lambda: Call(lambda x, w, b: torch.addmm(b, x, w), torch.randn(64, 48), torch.randn(48)),
        lambda: [torch.randn(128, 64)],
        "addmm",
    ),
    "baddbmm": (
        lambda: Call(lambda a, b: torch.baddbmm(torch.zeros(4, 64, 64), a, b)),
        lambda: [torch.randn(4, 64, 32), torch.randn(4, 32, 64)],
        "addmm",
    ),
    "rms_norm": (
        lambda: Call(lambda x, w: F.rms_norm(x, (64,), w), torch.rand(64) + 0.5),
        lambda: [torch.randn(4, 32, 64) * 3],
        "rms_norm",
    ),
    "layer_scale": (
        lambda: Call(lambda x, gamma: x * gamma, torch.rand(64)),
        lambda: [torch.randn(4, 32, 64)],
        "mul",
    ),
    "quick_gelu": (  # hand-written activation: x * sigmoid(1.702 x)
        lambda: Call(lambda x: x * torch.sigmoid(1.702 * x)),
        lambda: [torch.randn(4, 32, 64) * 2],
        "mul",
    ),
    # (the derivative jumps at ±3: codes rounded across a kink cost a little more)
    "hardswish": (nn.Hardswish, lambda: [torch.randn(4, 32, 64) * 3], "pointwise"),
    "max_pool": (
        lambda: nn.MaxPool2d(3, stride=2, padding=1),
        lambda: [torch.randn(2, 8, 32, 32)],
        "max_pool",
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_new_ops_are_compressed_and_close(name: str) -> None:
    make, inputs, kind = CASES[name]
    torch.manual_seed(0)
    err, base, ours, s = _compare(make(), inputs())
    assert kind in s.counts(), (s.counts(), [r for r in s.full_precision])
    assert err < (0.05 if name == "hardswish" else 0.03), err
    assert ours < 0.6 * base, (ours, base)


def test_average_pools_keep_nothing_and_are_exact() -> None:
    # autograd keeps avg_pool*d's whole input (only its shape is needed); Mesa keeps nothing
    for pool, x in (
        (nn.AvgPool2d(2), torch.randn(2, 4, 8, 8)),
        (nn.AvgPool1d(3, stride=2, padding=1), torch.randn(2, 4, 9)),
        (nn.AvgPool3d(2, ceil_mode=True), torch.randn(1, 2, 5, 4, 4)),
    ):
        err, base, ours, _ = _compare(pool, [x])
        assert err == 0.0 and ours == 0 and base == x.numel() * 4


def test_dropout_mask_is_one_bit_and_exact() -> None:
    module = nn.Sequential(nn.Dropout(0.3), Call(lambda x: x * 1.0))
    x = torch.randn(4, 32, 64)
    err, base, ours, _ = _compare(module, [x], seed=3)
    assert err == 0.0  # the mask is lossless: gradients are identical
    assert ours * 8 <= x.numel() + 8  # one bit per element (the baseline keeps a float noise)
    assert base == x.numel() * 4


def test_custom_autograd_function_and_ev_dtm() -> None:
    class Square(torch.autograd.Function):
        @staticmethod
        def forward(ctx: object, x: Tensor) -> Tensor:
            ctx.save_for_backward(x)  # type: ignore[attr-defined]
            return x * x

        @staticmethod
        def backward(ctx: object, g: Tensor) -> Tensor:
            (x,) = ctx.saved_tensors  # type: ignore[attr-defined]
            return 2 * x * g

    err, base, ours, s = _compare(Call(Square.apply), [torch.randn(4, 32, 64)])
    assert "function" in s.counts() and err < 0.03 and ours < 0.3 * base

    from ev_core.layers.dtm import deform_merge_2x2_nhwc

    torch.manual_seed(0)
    dtm = Call(
        lambda x, off, w: deform_merge_2x2_nhwc(x, off, w),
        torch.randn(16, 8, 2, 2) * 0.2,
    )
    x = torch.randn(2, 16, 16, 8)
    offset = torch.randn(2, 8, 8, 8) * 0.5
    err, base, ours, s = _compare(dtm, [x, offset])
    assert "function" in s.counts() and err < 0.05 and ours < 0.5 * base


def test_summary_lists_what_stays_full_precision() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8 * 15 * 15, 4)
    )
    conv = mesa.convert(model)
    conv(torch.randn(2, 3, 32, 32)).sum().backward()
    s = mesa.summary(conv)
    fp = {(r.module, r.op, r.reason) for r in s.full_precision}
    assert ("0", "conv2d", "excluded by the policy") not in fp  # "0" is not a patch embedding
    assert ("1", "max_pool2d", "not floating point") in fp  # the int64 indices
    assert all(r.nbytes > 0 for r in s.full_precision)
    assert "Kept in full precision" in str(s) and "not floating point" in str(s)
