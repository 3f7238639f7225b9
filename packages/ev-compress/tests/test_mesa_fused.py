"""Mesa's fused CPU kernels (inductor-compiled): the noise table and its row offsets against
lowbias32 written with Python integers, the kernels against the explicit formulas, and a converted
model that takes the fused path (eager and compiled alike)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ev_compress import mesa
from ev_compress.mesa import GroupLayout, _fused, dequantize, quantize
from ev_compress.mesa.ops import _library

needs_fused = pytest.mark.skipif(
    not _fused.available(), reason=f"fused CPU kernels unavailable: {_fused.status()}"
)

MASK32 = (1 << 32) - 1
INT32 = torch.iinfo(torch.int32)


def _lowbias32(z: int) -> int:
    """lowbias32 of a 32-bit word, in Python integers (logical shifts, 32-bit wrap-around)."""
    z &= MASK32
    z = ((z ^ (z >> 16)) * 0x21F0AAAD) & MASK32
    z = ((z ^ (z >> 15)) * 0x735A2D97) & MASK32
    return z ^ (z >> 15)


def _offset(row: int, seed: int) -> int:
    return _lowbias32(row ^ seed ^ 0x5BD1E995) >> (32 - 18)


def test_lowbias32_wraps_like_python_integers() -> None:
    z = torch.tensor([0, 1, 2, 1000, 65535, 65536, 2**30 + 7, INT32.max, INT32.min, -1])
    got = _fused._lowbias32(z.to(torch.int32))
    ref = [_lowbias32(int(v)) for v in z]
    assert [int(v) & MASK32 for v in got] == ref


def test_seed32_folds_both_halves() -> None:
    assert _fused.seed32(0) == 0 and _fused.seed32(5) == 5
    assert _fused.seed32(1 << 32) == 1  # the high half counts
    assert _fused.seed32(0xFFFFFFFF) == -1  # signed int32
    seeds = {_fused.seed32(s * 1_099_511_627) for s in range(1000)}
    assert len(seeds) == 1000 and all(INT32.min <= s <= INT32.max for s in seeds)


def test_noise_table_is_the_grid_in_hash_order() -> None:
    """Every centred grid value ``(k + ½)/2¹⁸`` exactly once, ordered by the hash of ``k``
    (Python integers): the rounding noise is uniform over the grid whatever the offsets."""
    table = _fused.noise_table()
    n = _fused.TABLE_SIZE
    assert table.shape == (n,) and table.dtype == torch.float32
    grid = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    assert torch.equal(table.double().sort().values, grid)
    order = sorted(range(n), key=lambda k: _lowbias32(k ^ 0x2545F491))
    assert torch.equal(table.double(), grid[torch.tensor(order)])
    # the order is not the grid's: neighbours are uncorrelated (|r| < 5 standard errors)
    u = table.double()
    assert abs(float(torch.corrcoef(torch.stack([u[1:], u[:-1]]))[0, 1])) < 5 / math.sqrt(n)


@needs_fused
def test_compiled_row_offsets_match_python_integers() -> None:
    """The offsets as inductor compiles the hash (vector body and scalar tail): a wrapping
    32-bit signed multiply is undefined behaviour in C++, so this is checked, not assumed."""
    for rows, seed in ((3017, 987654321), (64, -5), (70001, INT32.min)):
        got = _fused._call("row_offsets", torch.empty(rows, dtype=torch.uint8), _i32(seed))
        assert got.dtype == torch.int32
        assert got.tolist() == [_offset(r, seed) for r in range(rows)], seed


def _i32(v: int) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.int32)


def test_noise_field_is_the_table_read_at_hashed_row_offsets() -> None:
    """Element ``(p, g, r)`` gets ``table[(offset + r) mod 2¹⁸]``, ``offset`` the top 18 bits of
    the lowbias32 hash of the noise row's index XOR the seed XOR the row salt (Python integers);
    windows near the table's end wrap around, and rows longer than the table are cut into ``c``
    equal noise rows (``c`` the smallest divisor that makes them fit) so that no entry repeats
    within a row."""
    table = _fused.noise_table()
    n = _fused.TABLE_SIZE
    for shape, seed, cut in (((5, 3, 70), -123456789, 1), ((2, 2, 300_000), 42, 2)):
        u = _fused.noise_field(shape, _i32(seed))
        assert u.shape == shape and u.dtype == torch.float32
        length = shape[2] // cut
        view = u.reshape(shape[0] * shape[1] * cut, length)
        for row in range(view.shape[0]):
            index = (_offset(row, seed) + torch.arange(length)) % n
            assert torch.equal(view[row], table[index]), row
        if shape[2] > n:  # within a long row no entry comes back at the table's period
            assert not torch.equal(u[0, 0, : shape[2] - n], u[0, 0, n:])
    # 2¹⁸ + 1 = 5 · 52429; 2¹⁸ + 3 is prime: one element per noise row
    split = [_fused._split(r) for r in (1, n, n + 1, n + 3, 300_000, 263_169)]
    assert split == [1, 1, 5, n + 3, 2, 3]


def test_noise_field_rows_are_spread_and_uncorrelated() -> None:
    """Rows read the table at scattered offsets: the offsets are uniform over the table, and
    neither neighbours within a row, the same position of neighbouring rows nor two seeds are
    correlated. (1 M elements from a 2¹⁸-entry table: each entry is read ~4 times, which widens
    the standard error of a correlation ~2×; the bound is 10/√n.)"""
    shape = (512, 8, 256)
    rows = torch.empty(shape[0] * shape[1], dtype=torch.uint8)
    offset = _fused._row_offsets_kernel(rows, _i32(7))
    assert int(offset.min()) >= 0 and int(offset.max()) < _fused.TABLE_SIZE
    counts = torch.histc(offset.double(), bins=64, min=0, max=_fused.TABLE_SIZE)
    expected = offset.numel() / 64
    assert float(((counts - expected) ** 2 / expected).sum()) < 130  # chi-square, 63 d.o.f.
    u = _fused.noise_field(shape, _i32(7)).double().reshape(-1, 256)
    v = _fused.noise_field(shape, _i32(8)).double().reshape(-1, 256)
    assert float(u.min()) > 0 and float(u.max()) < 1
    assert abs(float(u.mean()) - 0.5) < 4e-3 and abs(float(u.var()) - 1 / 12) < 1e-3
    bound = 10 / math.sqrt(u.numel())
    for a, b in ((u[:, 1:], u[:, :-1]), (u[1:], u[:-1]), (u, v)):
        assert abs(float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])) < bound


def test_noise_of_one_element_over_seeds_is_uniform_on_the_grid() -> None:
    """Across seeds (training steps) one element's noise is a fresh uniform draw: its mean is ½
    and its histogram flat, so stochastic rounding stays unbiased step after step."""
    n = 1 << 16
    seeds = torch.arange(n, dtype=torch.int64) * 0x9E3779B9
    offsets = torch.tensor([_offset(5, _fused.seed32(int(s))) for s in seeds])
    u = _fused.noise_table()[(offsets + 3) % _fused.TABLE_SIZE].double()
    assert abs(float(u.mean()) - 0.5) < 5 * 0.289 / math.sqrt(n)
    counts = torch.histc(u, bins=64, min=0, max=1)
    assert float(((counts - n / 64) ** 2 / (n / 64)).sum()) < 130  # chi-square, 63 d.o.f.


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
    seed32 = torch.tensor(_fused.seed32(int(seed)), dtype=torch.int32)
    v = xg.double() * inv.double()[None, :, None] + off.double()[None, :, None]
    u_seeded = _fused.noise_field(tuple(xg.shape), seed32).double()
    for codes, u in (
        (_fused.quantize(xg, inv, off, 255.0, seed), u_seeded),
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
def test_fused_quantize_of_rows_longer_than_the_table() -> None:
    """A row longer than the noise table (a large attention map or feature map per group) is
    quantised with the noise of :func:`noise_field`, which cuts it into noise rows that fit."""
    g = torch.Generator().manual_seed(6)
    xg = torch.randn(1, 2, 300_000, generator=g) * torch.tensor([1.0, 3.0])[:, None]
    inv, off = torch.tensor([30.0, 10.0]), torch.tensor([128.0, 128.0])
    seed = torch.tensor(31337)
    codes = _fused.quantize(xg, inv, off, 255.0, seed)
    u = _fused.noise_field(tuple(xg.shape), _i32(_fused.seed32(31337))).double()
    v = xg.double() * inv.double()[None, :, None] + off.double()[None, :, None]
    diff = (codes.double() - (v + u).clamp(0, 255).floor()).abs()
    assert codes.shape == xg.shape and float(diff.max()) <= 1
    assert float((diff > 0).double().mean()) < 1e-4


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
def test_fused_dequantize_rows_matches_the_formula(dtype: torch.dtype) -> None:
    """Per-row scaled dequantisation (a layer norm's input rebuilt for its backward), the kernel
    and ``dq_rows`` on both paths, against float64 math."""
    g = torch.Generator().manual_seed(5)
    codes = torch.randint(0, 256, (2048, 4, 64), generator=g, dtype=torch.uint8)  # 2^19
    step, minimum = torch.rand(4, generator=g) * 0.1, torch.randn(4, generator=g)
    scale = torch.rand(2048, generator=g) * 4 + 0.01
    ref = codes.double() * step.double()[None, :, None] + minimum.double()[None, :, None]
    ref = ref * scale.double()[:, None, None]
    eps = torch.finfo(dtype).eps
    tol = {"rtol": 2 * eps, "atol": 4 * float(ref.abs().max()) * eps}
    out = _fused.dequantize_rows(codes, step, minimum, scale, dtype)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), ref, **tol)
    shape = (32, 64, 256)  # each code row one row of the last dimension
    fused = _library.dq_rows(codes, step, minimum, shape, dtype, scale.reshape(32, 64, 1))
    torch.testing.assert_close(fused.double(), ref.reshape(shape), **tol)
    small = _library.dq_rows(codes[:2], step, minimum, (2, 256), dtype, scale[:2])  # torch path
    torch.testing.assert_close(small.double(), ref[:2].reshape(2, 256), **tol)


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
    u = _fused.noise_field(tuple(x.shape), seed32).double()
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


@needs_fused
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_normalisation_in_the_kernels_gives_the_codes_of_the_normalised_tensor(
    dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``quantize(x, normalize=(mean, rstd))`` (a layer norm's input, per-token statistics) runs
    the ``_rows`` kernels, which normalise in registers: the same estimates and codes, bit for
    bit, as quantising ``(x − mean)·rstd`` computed by torch."""
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(64, 40, 384, generator=g) * 3 + torch.randn(64, 40, 1, generator=g)).to(dtype)
    var, mean = torch.var_mean(x.float(), dim=-1, keepdim=True, correction=0)
    rstd = (var + 1e-6).rsqrt()
    xn = (x.float() - mean) * rstd
    layout = mesa.make_layout(x.shape, "channels")
    kernels: list[str] = []
    call = _fused._call
    monkeypatch.setattr(_fused, "_call", lambda name, *a: kernels.append(name) or call(name, *a))
    for stochastic in (True, False):
        kw = {"stochastic": stochastic, "seed": torch.tensor(5) if stochastic else None}
        fused = quantize(x, layout, normalize=(mean, rstd), **kw)
        explicit = quantize(xn, layout, **kw)
        assert fused.dtype == torch.float32 and fused.shape == x.shape
        assert torch.equal(fused.step, explicit.step) and torch.equal(
            fused.minimum, explicit.minimum
        )
        assert torch.equal(fused.data, explicit.data)
    assert {"minmax_rows", "stochastic_rows", "nearest_rows"} <= set(kernels), kernels
    # statistics that are not one per row (a 2-D normalized_shape) are applied by torch first
    mean2 = x.float().mean(dim=(-2, -1), keepdim=True)
    q2 = quantize(x, layout, normalize=(mean2, torch.ones_like(mean2)), seed=torch.tensor(5))
    ref2 = quantize(x.float() - mean2, layout, seed=torch.tensor(5))
    assert torch.equal(q2.data, ref2.data)


@needs_fused
def test_fused_layer_norm_backward_matches_the_formula_on_its_codes() -> None:
    """The layer-norm op's backward on the fused path (input rebuilt as normalised codes / rstd,
    the true rstd given to ``native_layer_norm_backward``) against the layer-norm gradient
    written out in float64 on the dequantised normalised values."""
    g = torch.Generator().manual_seed(7)
    x = (torch.randn(64, 128, 64, generator=g) * 3 + 1).requires_grad_()  # 2¹⁹ elements
    w = torch.randn(64, generator=g).requires_grad_()
    b = torch.randn(64, generator=g).requires_grad_()
    nan = torch.full((8,), float("nan"))
    out, codes, step, minimum, rstd, _, _ = torch.ops.ev_mesa.layer_norm(
        x, w, b, [64], 1e-5, nan, nan.clone(), torch.tensor(3), 0, 2, 8, 8, 0.1, True, True
    )
    grad = torch.randn(out.shape, generator=g)
    out.backward(grad)
    xn = codes.double() * step.double()[None, :, None] + minimum.double()[None, :, None]
    xn = xn.reshape(x.shape)
    gd, r = grad.double(), rstd.double()
    gxn = gd * w.detach().double()
    gx = r * (gxn - gxn.mean(-1, keepdim=True) - xn * (gxn * xn).mean(-1, keepdim=True))
    for got, ref in ((x.grad, gx), (w.grad, (gd * xn).sum((0, 1))), (b.grad, gd.sum((0, 1)))):
        assert got is not None
        rel = float((got.double() - ref).norm() / ref.norm())
        assert rel < 1e-5, rel
