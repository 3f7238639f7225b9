"""Mesa's fused CPU kernels (inductor-compiled): the counter-based noise against splitmix64
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

MASK64 = (1 << 64) - 1


def _splitmix_u(index: int, seed: int) -> float:
    """The noise of one element, in Python integers (logical shifts, 64-bit wrap-around)."""
    z = index ^ seed
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    z ^= z >> 31
    return ((z >> 40) + 0.5) / (1 << 24)


def test_noise_is_splitmix64() -> None:
    index = torch.tensor([0, 1, 2, 3, 1000, 2**31 - 1, 2**31, 2**40 + 7, 2**62], dtype=torch.int64)
    for seed in (0, 1, 12345, 2**62 + 3, (1 << 63) - 1):
        got = _fused.noise(index, torch.tensor(seed, dtype=torch.int64))
        ref = torch.tensor([_splitmix_u(int(i), seed) for i in index], dtype=torch.float32)
        assert torch.equal(got, ref), seed


def test_noise_is_uniform_and_uncorrelated() -> None:
    n = 1 << 20
    index = torch.arange(n, dtype=torch.int64)
    u = _fused.noise(index, torch.tensor(7)).double()
    v = _fused.noise(index, torch.tensor(8)).double()
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
    index = torch.arange(xg.numel(), dtype=torch.int64).view(xg.shape)
    v = xg.double() * inv.double()[None, :, None] + off.double()[None, :, None]
    for codes, u in (
        (_fused.quantize(xg, inv, off, 255.0, seed), _fused.noise(index, seed).double()),
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
def test_two_byte_inputs_quantised_in_chunks_match_one_pass(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """bf16 input, converted and quantised a few rows at a time: the same codes as the float32
    kernel on the whole converted tensor (the noise follows the element's global position)."""
    g = torch.Generator().manual_seed(2)
    xg = torch.randn(37, 4, 50, generator=g).bfloat16()
    inv, off = torch.full((4,), 40.0), torch.full((4,), 128.0)
    seed = torch.tensor(77)
    whole = _fused.quantize(xg.float(), inv, off, 255.0, seed)
    monkeypatch.setattr(_fused, "_CHUNK", 3 * 4 * 50)  # 3 rows a chunk, 13 chunks
    chunked = _fused.quantize(xg, inv, off, 255.0, seed)
    assert torch.equal(chunked, whole)
    assert torch.equal(
        _fused.quantize(xg, inv, off, 255.0, None),
        _fused.quantize(xg.float(), inv, off, 255.0, None),
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
    u = _fused.noise(torch.arange(n).view(x.shape), seed).double()
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
    and ``torch.compile`` (aot_eager) runs stay bit-identical, and the gradients agree with the
    torch path's (other noise, same estimator) to a float64 cosine of 0.999."""
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
    assert len(calls) >= 3  # norm, fc1 and fc2 inputs (at least)
    torch._dynamo.reset()
    g_comp = _grads(compiled, torch.compile(compiled, fullgraph=True, backend="aot_eager"), x)
    for name, g in g_eager.items():
        assert torch.equal(g_comp[name], g), name
    monkeypatch.setattr(_fused, "MIN_NUMEL", 1 << 40)  # everything on the torch path
    g_torch = _grads(torch_path, torch_path, x)
    for name, g in g_eager.items():
        cos = F.cosine_similarity(g.double().flatten(), g_torch[name].double().flatten(), dim=0)
        assert float(cos) > 0.999, (name, float(cos))
