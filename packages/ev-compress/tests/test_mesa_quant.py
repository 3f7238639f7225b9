"""Mesa quantisation core: grouping, error bounds, stochastic rounding, clamping, estimates."""

from __future__ import annotations

import pytest
import torch

from ev_compress.mesa import (
    GroupLayout,
    dequantize,
    make_layout,
    pack_bits,
    quantize,
    unpack_bits,
    update_running_range,
)


def test_layouts() -> None:
    assert make_layout((2, 17, 192), "channels") == GroupLayout(2, 8)
    assert make_layout((2, 17, 192), "channels", channel_groups=5) == GroupLayout(2, 4)
    assert make_layout((2, 3, 32, 32), "channels") == GroupLayout(1, 3)  # RGB: 3 groups
    assert make_layout((2, 64, 8, 8), "channels") == GroupLayout(1, 8)
    assert make_layout((2, 6, 17, 64), "heads") == GroupLayout(1, 6)  # head-wise
    assert make_layout((2, 6, 17, 64), "heads", head_groups=2) == GroupLayout(1, 2)
    assert make_layout((2, 3, 17, 64), "heads", head_groups=2) == GroupLayout(1, 1)
    assert make_layout((2, 17, 64), "heads") == GroupLayout(2, 8)  # no head dim: channels
    assert make_layout((4, 16, 10), "dim1") == GroupLayout(1, 8)
    assert make_layout((), "channels") == GroupLayout(0, 1)
    with pytest.raises(ValueError):
        make_layout((2, 3), "rows")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        make_layout((2, 3), "channels", channel_groups=0)


def _naive_group_stats(x: torch.Tensor, dim: int, groups: int) -> tuple[list[float], list[float]]:
    """Per-group (range, min) by explicit slicing along ``dim``."""
    chunk = x.shape[dim] // groups
    ranges, mins = [], []
    for g in range(groups):
        part = x.narrow(dim, g * chunk, chunk).double()
        ranges.append(float(part.max() - part.min()))
        mins.append(float(part.min()))
    return ranges, mins


def test_first_batch_initialises_then_momentum() -> None:
    torch.manual_seed(0)
    x1 = torch.randn(3, 5, 16) * torch.arange(1, 17.0)  # channel-dependent scale
    x2 = torch.randn(3, 5, 16) * 3 + 1
    layout = make_layout(x1.shape, "channels", channel_groups=4)
    rng, mn = torch.empty(4), torch.empty(4)
    quantize(x1, layout, running_range=rng, running_min=mn, initialise=True)
    r1, m1 = _naive_group_stats(x1, 2, 4)
    torch.testing.assert_close(rng, torch.tensor(r1, dtype=torch.float32))
    torch.testing.assert_close(mn, torch.tensor(m1, dtype=torch.float32))
    quantize(x2, layout, running_range=rng, running_min=mn, momentum=0.9)
    r2, m2 = _naive_group_stats(x2, 2, 4)
    want_r = [a - 0.1 * (a - b) for a, b in zip(r1, r2, strict=True)]
    want_m = [a - 0.1 * (a - b) for a, b in zip(m1, m2, strict=True)]
    torch.testing.assert_close(rng, torch.tensor(want_r, dtype=torch.float32))
    torch.testing.assert_close(mn, torch.tensor(want_m, dtype=torch.float32))
    # update=False (e.g. a checkpoint recomputation) leaves the estimates alone
    quantize(x1, layout, running_range=rng, running_min=mn, update=False)
    torch.testing.assert_close(rng, torch.tensor(want_r, dtype=torch.float32))


def test_non_finite_batch_leaves_estimates() -> None:
    rng, mn = torch.tensor([2.0, 3.0]), torch.tensor([-1.0, 0.0])
    update_running_range(
        rng, mn, torch.tensor([float("inf"), 1.0]), torch.tensor([0.0, float("nan")]), 0.9
    )
    assert rng.tolist() == [2.0, 3.0] and mn.tolist() == [-1.0, 0.0]
    with pytest.raises(ValueError):
        update_running_range(rng, mn, rng, mn, 1.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_round_trip_error_bound(dtype: torch.dtype) -> None:
    torch.manual_seed(1)
    x = (torch.randn(4, 6, 9, 8) * torch.linspace(0.1, 5, 6)[:, None, None]).to(dtype)
    layout = make_layout(x.shape, "heads")
    ranges, _ = _naive_group_stats(x, 1, 6)
    steps = torch.tensor(ranges) / 255
    for stochastic, bound in ((False, 0.5), (True, 1.0)):
        q = quantize(x, layout, stochastic=stochastic)
        assert q.data.dtype == torch.uint8 and q.data.numel() == x.numel()
        x_hat = dequantize(q)
        assert x_hat.dtype == dtype and x_hat.shape == x.shape
        err = (x_hat.double() - x.double()).abs().amax(dim=(0, 2, 3))
        # + the dtype's own rounding of the dequantised value
        slack = x.double().abs().amax() * torch.finfo(dtype).eps
        assert torch.all(err <= bound * steps.double() * (1 + 1e-5) + slack)


def test_stochastic_rounding_is_unbiased() -> None:
    # fixed range [0, 255] -> step 1; values at fractional positions between codes
    x = torch.tensor([[0.3, 10.5, 100.9, 200.02, 254.75, 7.0]])
    layout = GroupLayout(1, 1)
    rng, mn = torch.tensor([255.0]), torch.tensor([0.0])
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack(
        [
            dequantize(
                quantize(x, layout, running_range=rng, running_min=mn, update=False, generator=gen)
            )
            for _ in range(4000)
        ]
    )
    # every draw is one of the two neighbouring codes
    assert torch.all((draws == x.floor()) | (draws == x.ceil()))
    # mean -> x: the std of one draw is <= 0.5, so 4000 draws give a std error <= 0.008
    torch.testing.assert_close(draws.mean(0), x, atol=0.03, rtol=0)
    # deterministic rounding is biased by the fractional part (0.3 -> 0, 0.9 -> 1)
    det = dequantize(
        quantize(x, layout, running_range=rng, running_min=mn, update=False, stochastic=False)
    )
    assert det[0, 0] == 0.0 and det[0, 2] == 101.0


def test_clamps_at_both_ends() -> None:
    layout = GroupLayout(1, 1)
    rng, mn = torch.tensor([1.0]), torch.tensor([0.0])
    x = torch.tensor([[-5.0, 0.2, 7.0, 1.0 + 1e-3, 300.0]])
    q = quantize(x, layout, running_range=rng, running_min=mn, update=False, stochastic=False)
    assert q.data.flatten().tolist() == [0, 51, 255, 255, 255]  # no wrap-around above 255
    torch.testing.assert_close(
        dequantize(q), torch.tensor([[0.0, 0.2, 1.0, 1.0, 1.0]]), rtol=0, atol=1e-6
    )


def test_fewer_bits() -> None:
    x = torch.linspace(-1, 1, 50).reshape(1, 50)
    q = quantize(x, GroupLayout(1, 1), bits=4, stochastic=False)
    assert int(q.data.max()) == 15 and int(q.data.min()) == 0
    assert (dequantize(q) - x).abs().max() <= 2 / 15 / 2 + 1e-6
    with pytest.raises(ValueError):
        quantize(x, GroupLayout(1, 1), bits=9)
    with pytest.raises(TypeError):
        quantize(torch.ones(3, dtype=torch.int64), GroupLayout(0, 1))


def test_snapshot_is_independent_of_later_updates() -> None:
    x = torch.randn(8, 16)
    layout = make_layout(x.shape, "channels")
    rng, mn = torch.empty(8), torch.empty(8)
    q = quantize(x, layout, running_range=rng, running_min=mn, initialise=True)
    before = dequantize(q)
    quantize(x * 10, layout, running_range=rng, running_min=mn)
    torch.testing.assert_close(dequantize(q), before, rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(1,), (7,), (8,), (3, 5, 11)])
def test_pack_bits_round_trip(shape: tuple[int, ...]) -> None:
    mask = torch.rand(shape) > 0.5
    packed = pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == (mask.numel() + 7) // 8
    assert torch.equal(unpack_bits(packed, shape), mask)
    # bit i of byte j is element 8j + i
    assert pack_bits(torch.tensor([True, False, True, False, False, False, False, True])) == 133


_TRITON_SCRIPT = r"""
import torch
from ev_compress.mesa import _triton, quant
x = torch.randn(2, 4, 9, 16) * 3
lay = quant.make_layout(x.shape, "heads")
xg = x.reshape(lay.view_shape(x.shape)).contiguous()
mn, mx = _triton.group_minmax(xg)
assert torch.equal(mn, xg.amin(dim=(0, 2))) and torch.equal(mx, xg.amax(dim=(0, 2)))
rng, m0 = quant._batch_range(xg)
step = rng / 255
inv = 1 / step
codes = _triton.quantize(xg, inv, -m0 * inv, 255.0, False, None)
assert torch.equal(codes, quant.quantize(x, lay, stochastic=False).data)  # same product-sum
seeds = [quant.mix_seed(torch.tensor(i), 7) for i in range(40)]
draws = torch.stack([
    _triton.dequantize(_triton.quantize(xg, inv, -m0 * inv, 255.0, True, s), step, m0, torch.float32)
    for s in seeds
])
# the seed tensor alone decides the noise
again = _triton.quantize(xg, inv, -m0 * inv, 255.0, True, seeds[3])
assert torch.equal(again, _triton.quantize(xg, inv, -m0 * inv, 255.0, True, seeds[3]))
# unbiased: the mean of 40 draws is within 0.5 step (its standard error is <= 0.08 step)
assert ((draws.mean(0) - xg).abs() <= step[None, :, None] * 0.5).all()
assert _triton.dequantize(codes, step, m0, torch.bfloat16).dtype == torch.bfloat16
print("ok")
"""


def test_triton_kernels_in_the_interpreter() -> None:
    """The Triton kernels (CUDA path) run on CPU tensors under ``TRITON_INTERPRET=1``: exact
    per-group min/max, the same codes as the torch path with round-to-nearest, unbiased
    stochastic rounding."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    res = subprocess.run(
        [sys.executable, "-c", _TRITON_SCRIPT], env=env, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]
