"""Mesa's fused CPU kernels (inductor-compiled): the counter-based noise against lowbias32
written with Python integers, the kernels against the explicit formulas, and a converted model
that takes the fused path (eager and compiled alike)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ev_compress import mesa
from ev_compress.mesa import GroupLayout, _fused, dequantize, quantize

needs_fused = pytest.mark.skipif(
    not _fused.available(), reason=f"fused CPU kernels unavailable: {_fused.status()}"
)

MASK32 = (1 << 32) - 1
INT32 = torch.iinfo(torch.int32)


def _lowbias32_u(index: int, seed: int) -> float:
    """The noise of one element, in Python integers (logical shifts, 32-bit wrap-around)."""
    z = (index ^ seed) & MASK32
    z = ((z ^ (z >> 16)) * 0x21F0AAAD) & MASK32
    z = ((z ^ (z >> 15)) * 0x735A2D97) & MASK32
    z ^= z >> 15
    return ((z >> 9) + 0.5) / (1 << 23)


def test_noise_is_lowbias32() -> None:
    index = torch.tensor([0, 1, 2, 3, 1000, 65535, 65536, 2**30 + 7, INT32.max], dtype=torch.int32)
    for seed in (0, 1, 12345, INT32.max, INT32.min, -1):
        got = _fused.noise(index, torch.tensor(seed, dtype=torch.int32))
        ref = torch.tensor([_lowbias32_u(int(i), seed) for i in index], dtype=torch.float32)
        assert torch.equal(got, ref), seed


def test_seed32_folds_both_halves() -> None:
    assert _fused.seed32(0) == 0 and _fused.seed32(5) == 5
    assert _fused.seed32(1 << 32) == 1  # the high half counts
    assert _fused.seed32(0xFFFFFFFF) == -1  # signed int32
    seeds = {_fused.seed32(s * 1_099_511_627) for s in range(1000)}
    assert len(seeds) == 1000 and all(INT32.min <= s <= INT32.max for s in seeds)


@needs_fused
def test_compiled_noise_matches_python_integers() -> None:
    """The hash as inductor compiles it (vector body and scalar tail): a wrapping 32-bit signed
    multiply is undefined behaviour in C++, so this is checked, not assumed."""
    compiled = torch.compile(_fused.noise, dynamic=True, fullgraph=True)
    for n, seed in ((3017, 987654321), (64, -5)):
        index = torch.arange(n, dtype=torch.int32) * 7919  # wide spread of index values
        got = compiled(index, torch.tensor(seed, dtype=torch.int32))
        ref = torch.tensor([_lowbias32_u(int(i), seed) for i in index], dtype=torch.float32)
        assert torch.equal(got, ref), seed


def test_noise_is_uniform_and_uncorrelated() -> None:
    n = 1 << 20
    index = torch.arange(n, dtype=torch.int32)
    u = _fused.noise(index, torch.tensor(7, dtype=torch.int32)).double()
    v = _fused.noise(index, torch.tensor(8, dtype=torch.int32)).double()
    assert float(u.min()) > 0 and float(u.max()) < 1
    # mean and variance of U(0, 1) (standard errors 2.8e-4 and 8e-5)
    assert abs(float(u.mean()) - 0.5) < 2e-3 and abs(float(u.var()) - 1 / 12) < 5e-4
    # 64 equal bins: chi-square with 63 degrees of freedom (p = 1e-6 at ~130)
    counts = torch.histc(u, bins=64, min=0, max=1)
    chi2 = float(((counts - n / 64) ** 2 / (n / 64)).sum())
    assert chi2 < 130, chi2
    # neighbours and seeds are decorrelated (|r| < 5 standard errors)
    bound = 5 / math.sqrt(n)
    assert abs(float(torch.corrcoef(torch.stack([u[1:], u[:-1]]))[0, 1])) < bound
    assert abs(float(torch.corrcoef(torch.stack([u, v]))[0, 1])) < bound


@needs_fused
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_quantize_matches_the_formula(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    xg = (torch.randn(40, 3, 700, generator=g) * torch.tensor([0.5, 2.0, 9.0])[:, None]).to(dtype)
    mn = xg.float().amin(dim=(0, 2)) + 0.1  # a little is clamped at both ends
    rng = xg.float().amax(dim=(0, 2)) - 0.1 - mn
    step = rng / 255
    inv, off = 1 / step, -mn / step
    seed = torch.tensor(987654321, dtype=torch.int64)
    index = torch.arange(xg.numel(), dtype=torch.int32).view(xg.shape)
    seed32 = torch.tensor(_fused.seed32(int(seed)), dtype=torch.int32)
    v = xg.double() * inv.double()[None, :, None] + off.double()[None, :, None]
    for codes, u in (
        (_fused.quantize(xg, inv, off, 255.0, seed), _fused.noise(index, seed32).double()),
        (_fused.quantize(xg, inv, off, 255.0, None), torch.full_like(v, 0.5)),
    ):
        ref = (v + u).clamp(0, 255).floor()
        assert codes.dtype == torch.uint8 and codes.shape == xg.shape
        diff = (codes.double() - ref).abs()
        # float32 rounding of x·inv + off (+ FMA contraction) can move a value sitting on a code
        # boundary by one code: rare, never more
        assert float(diff.max()) <= 1 and float((diff > 0).double().mean()) < 1e-4
    # min/max: exact
    lo, hi = _fused.group_minmax(xg)
    assert torch.equal(lo, xg.float().amin(dim=(0, 2))) and torch.equal(
        hi, xg.float().amax(dim=(0, 2))
    )


@needs_fused
def test_two_byte_inputs_give_the_codes_of_their_float32_values() -> None:
    """A bf16 input is read as it is by the kernel: the same codes as the float32 kernel on the
    converted tensor (the noise follows the element's position, not the dtype)."""
    g = torch.Generator().manual_seed(2)
    xg = torch.randn(37, 4, 50, generator=g).bfloat16()
    inv, off = torch.full((4,), 40.0), torch.full((4,), 128.0)
    for seed in (torch.tensor(77), None):
        assert torch.equal(
            _fused.quantize(xg, inv, off, 255.0, seed),
            _fused.quantize(xg.float(), inv, off, 255.0, seed),
        )


@needs_fused
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fused_dequantize_matches_the_formula(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 256, (50, 4, 300), generator=g, dtype=torch.uint8)
    step = torch.rand(4, generator=g) * 0.1
    minimum = torch.randn(4, generator=g)
    out = _fused.dequantize(codes, step, minimum, dtype)
    ref = codes.double() * step.double()[None, :, None] + minimum.double()[None, :, None]
    assert out.dtype == dtype
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(out.double(), ref, rtol=eps, atol=2 * float(ref.abs().max()) * eps)


@needs_fused
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_dequantize_affine_matches_the_formula(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(3)
    codes = torch.randint(0, 256, (50, 4, 30), generator=g, dtype=torch.uint8)
    scale, offset = torch.randn(4, 30, generator=g), torch.randn(4, 30, generator=g)
    out = _fused.dequantize_affine(codes, scale, offset, dtype)
    ref = codes.double() * scale.double()[None] + offset.double()[None]
    assert out.dtype == dtype
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(out.double(), ref, rtol=eps, atol=4 * float(ref.abs().max()) * eps)


@needs_fused
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_fused_gelu_from_codes_matches_the_formula(dtype: torch.dtype, approximate: str) -> None:
    """GELU's output and backward read from codes (one pass each, float32 inside) against
    float64 math on the dequantised values, to the output dtype's rounding."""
    g = torch.Generator().manual_seed(4)
    codes = torch.randint(0, 256, (40, 4, 33), generator=g, dtype=torch.uint8)
    step, minimum = torch.rand(4, generator=g) * 0.05, torch.randn(4, generator=g) - 4
    grad = torch.randn(40, 4, 33, generator=g).to(dtype)
    x = codes.double() * step.double()[None, :, None] + minimum.double()[None, :, None]
    cdf = 0.5 * (1 + torch.erf(x / math.sqrt(2)))
    pdf = torch.exp(-0.5 * x**2) / math.sqrt(2 * math.pi)
    if approximate == "tanh":
        k = math.sqrt(2 / math.pi)
        inner = k * (x + 0.044715 * x**3)
        t = torch.tanh(inner)
        y_ref = 0.5 * x * (1 + t)
        dy_ref = 0.5 * (1 + t) + 0.5 * x * (1 - t**2) * k * (1 + 3 * 0.044715 * x**2)
    else:
        y_ref, dy_ref = x * cdf, cdf + x * pdf
    y = _fused.dequantize_gelu(codes, step, minimum, dtype, approximate)
    gx = _fused.gelu_backward(grad, codes, step, minimum, approximate)
    assert y.dtype == gx.dtype == dtype
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 8e-3, "atol": 1e-5}
    torch.testing.assert_close(y.double(), y_ref, **tol)
    torch.testing.assert_close(gx.double(), grad.double() * dy_ref, **tol)


@needs_fused
def test_public_quantize_takes_the_fused_path_and_stays_unbiased() -> None:
    """A seeded ``quantize`` of a large CPU tensor runs the fused kernel (the codes are exactly
    the formula's with the hash noise) and its stochastic rounding is unbiased."""
    n = _fused.MIN_NUMEL
    frac = torch.tensor([0.3, 0.5, 0.9, 0.02])
    x = (torch.arange(n) % 200).float() + frac[torch.arange(n) % 4]
    x = x.reshape(n // 256, 1, 256)
    layout = GroupLayout(1, 1)
    rng, mn = torch.tensor([255.0]), torch.tensor([0.0])
    seed = torch.tensor(42)
    q = quantize(x, layout, running_range=rng, running_min=mn, update=False, seed=seed)
    seed32 = torch.tensor(_fused.seed32(42), dtype=torch.int32)
    u = _fused.noise(torch.arange(n, dtype=torch.int32).view(x.shape), seed32).double()
    ref = (x.double() + u).clamp(0, 255).floor()
    assert (q.data.double() - ref).abs().max() <= 1
    x_hat = dequantize(q)
    assert torch.all((x_hat == x.floor()) | (x_hat == x.ceil()))
    # mean error per fractional position -> 0 (std of one draw <= 0.5: n/4 draws, 5 sigma)
    err = (x_hat.double() - x.double()).reshape(-1, 4).mean(0)
    assert float(err.abs().max()) < 5 * 0.5 / math.sqrt(n / 4), err
    # the same seed gives the same codes; another seed other codes
    again = quantize(x, layout, running_range=rng, running_min=mn, update=False, seed=seed)
    other = quantize(x, layout, running_range=rng, running_min=mn, update=False, seed=seed + 1)
    assert torch.equal(again.data, q.data) and not torch.equal(other.data, q.data)


def test_status_names_the_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EV_MESA_FUSED", "0")
    _fused.status.cache_clear()
    try:
        assert _fused.status() == "disabled by EV_MESA_FUSED=0"
        assert not _fused.available() and not _fused.usable(torch.zeros(_fused.MIN_NUMEL))
    finally:
        monkeypatch.undo()
        _fused.status.cache_clear()


class _Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(64)
        self.fc1, self.fc2 = nn.Linear(64, 256), nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(self.norm(x)))).mean(1)


def _grads(model: nn.Module, run: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    F.cross_entropy(run(x), torch.arange(x.shape[0]) % 10).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return grads


@needs_fused
def test_converted_model_on_the_fused_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every quantised tensor of a converted MLP is large enough for the fused kernels: eager
    and ``torch.compile`` (aot_eager) runs draw the same noise (bit-identical running
    estimates) and agree to float32 rounding (eager backward reads GELU's codes through one-pass
    kernels whose ``erf``/``exp`` may differ from aten's by an ulp), and the gradients agree
    with the torch path's (other noise, same estimator) to a float64 cosine of 0.999."""
    x = torch.randn(8, 64, 64, generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(_fused, "MIN_NUMEL", x.numel())
    models = []
    for _ in range(3):
        torch.manual_seed(0)
        models.append(mesa.convert(_Mlp()))
    eager, compiled, torch_path = models
    calls = []
    real = _fused.quantize
    monkeypatch.setattr(_fused, "quantize", lambda *a: calls.append(1) or real(*a))
    g_eager = _grads(eager, eager, x)
    assert len(calls) == 2  # norm and GELU inputs (fc1's and fc2's: rebuilt from those codes)
    torch._dynamo.reset()
    g_comp = _grads(compiled, torch.compile(compiled, fullgraph=True, backend="aot_eager"), x)
    for name, g in g_eager.items():
        torch.testing.assert_close(g_comp[name], g, rtol=1e-5, atol=1e-6 * float(g.abs().max()))
    for name, (rng, mn) in mesa.running_estimates(eager).items():
        c_rng, c_mn = mesa.running_estimates(compiled)[name]
        assert torch.equal(c_rng, rng) and torch.equal(c_mn, mn), name
    monkeypatch.setattr(_fused, "MIN_NUMEL", 1 << 40)  # everything on the torch path
    g_torch = _grads(torch_path, torch_path, x)
    for name, g in g_eager.items():
        cos = F.cosine_similarity(g.double().flatten(), g_torch[name].double().flatten(), dim=0)
        assert float(cos) > 0.999, (name, float(cos))
