"""Each Mesa op: exact forward, exact backward on exactly representable inputs (gradcheck),
bounded backward error on random inputs against the op's own fp32 backward."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ev_compress import mesa
from ev_compress.mesa.quant import Layout
from ev_testing import BaseTester


class Call(nn.Module):
    """A module whose forward is a functional call (what timm/ev blocks do inline)."""

    def __init__(self, fn: Callable[..., Tensor]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, *args: Tensor) -> Tensor:
        return self.fn(*args)


def grid(shape: tuple[int, ...], layout: Layout, seed: int) -> Tensor:
    """float64 values that 8-bit per-group quantisation reproduces exactly: every group holds
    integer codes 0..255 (0 and 255 present) times a power-of-two step plus an offset."""
    g = torch.Generator().manual_seed(seed)
    gl = mesa.make_layout(shape, layout)
    pre, groups, rest = gl.view_shape(shape)
    codes = torch.randint(0, 256, (pre, groups, rest), generator=g).double()
    codes[0, :, 0] = 0
    codes[-1, :, -1] = 255
    step = 2.0 ** -torch.randint(5, 9, (groups,), generator=g).double()
    offset = torch.randint(-300, 300, (groups,), generator=g).double() * step
    return (codes * step[None, :, None] + offset[None, :, None]).reshape(shape)


EXACT = mesa.MesaPolicy(momentum=0.0, stochastic_rounding=False)


def _gradcheck(fn: Callable[..., Tensor], *inputs: Tensor) -> None:
    module = mesa.convert(Call(fn), EXACT)
    assert BaseTester.gradcheck(module, inputs, atol=1e-7, rtol=1e-5, fast_mode=True)
    assert mesa.summary(module).slots, "the op was not compressed"


def test_gradcheck_linear() -> None:
    _gradcheck(F.linear, grid((2, 3, 16), "channels", 0), torch.randn(5, 16), torch.randn(5))


def test_gradcheck_conv() -> None:
    w = torch.randn(4, 2, 3, 3)
    _gradcheck(
        lambda x, w, b: F.conv2d(x, w, b, stride=2, padding=1, groups=2),
        grid((2, 4, 5, 5), "channels", 1),
        w,
        torch.randn(4),
    )
    _gradcheck(
        lambda x, w: F.conv1d(x, w, padding="same"), grid((2, 2, 7), "channels", 2), w[..., 0]
    )


def normalised_grid(tokens: int, seed: int) -> Tensor:
    """float64 ``[tokens, 16]`` rows whose per-row normalisation 8-bit quantisation reproduces
    (to float64 rounding): every channel pair (one quantisation group) of a row holds
    ``(v, -v)`` with ``v`` = 1 in four pairs and 3 in the other four (row mean 0, variance 5),
    so every group's normalised values lie on ``{±1, ±3}/√5``, codes 0/85/170/255; rows are then
    scaled (by up to 2¹⁰, so ``eps`` is negligible) and shifted."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(tokens):
        v = torch.tensor([1.0] * 4 + [3.0] * 4, dtype=torch.float64)[torch.randperm(8, generator=g)]
        sign = torch.where(torch.rand(8, generator=g) < 0.5, -1.0, 1.0).double()
        pattern = torch.stack([v * sign, -v * sign], dim=1).flatten()
        scale = 2.0 ** float(torch.randint(6, 11, (), generator=g))
        rows.append(pattern * scale + float(torch.randn((), generator=g)) * 10)
    return torch.stack(rows)


def test_gradcheck_layer_norm() -> None:
    # layer norm quantises its per-token-normalised input
    _gradcheck(
        lambda x, w, b: F.layer_norm(x, (16,), w, b, 1e-6),
        normalised_grid(6, 3).reshape(2, 3, 16),
        torch.randn(16),
        torch.randn(16),
    )


def channel_grid(shape: tuple[int, ...], mean: Tensor, seed: int) -> Tensor:
    """float64 ``[B, C, ...]`` maps whose per-channel normalisation 8-bit quantisation
    reproduces: each channel holds ``mean[c] + s_c·{±1, ±3}`` (as many of each), so its
    normalised values are ``{±a, ±3a}`` (codes 0/85/170/255) whether normalised by the batch
    statistics or by a running mean equal to ``mean``."""
    g = torch.Generator().manual_seed(seed)
    n = math.prod(shape) // shape[1]
    pattern = torch.tensor([1.0, -1.0, 3.0, -3.0], dtype=torch.float64).repeat(n // 4)
    channels = []
    for c in range(shape[1]):
        scale = 2.0 ** float(torch.randint(-2, 3, (), generator=g))
        channels.append(mean[c] + scale * pattern[torch.randperm(n, generator=g)])
    rest = (shape[0], *shape[2:])
    return torch.stack([v.reshape(rest) for v in channels], dim=1)


@pytest.mark.parametrize("training", [True, False])
def test_gradcheck_batch_norm(training: bool) -> None:
    # batch norm quantises its input normalised per channel
    rm, rv = torch.randn(4).double(), torch.rand(4).double() + 0.5
    _gradcheck(
        lambda x, w, b: F.batch_norm(x, rm.clone(), rv.clone(), w, b, training=training),
        channel_grid((3, 4, 2, 2), rm, 4),
        torch.randn(4),
        torch.randn(4),
    )


def test_batch_norm_over_few_values_keeps_the_pre_norm_bias_gradient_zero() -> None:
    """A bias right before a training-mode batch norm has gradient 0 (the norm removes the
    mean). At a 1×1 map and batch 4 (4 values per channel, LITv2's last token merging at 32²)
    with biases far apart, quantising the raw input multiplied a channel group's rounding error
    by ``invstd``: the bias gradient was ~0.2× the weight's and grew without bound in training.
    The normalised, re-centred codes keep it at fp32 rounding and the input gradient close."""
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Conv2d(8, 16, 2, stride=2), nn.BatchNorm2d(16))
    with torch.no_grad():
        ref[0].bias.copy_(torch.randn(16) * 100)  # biases far apart: a wide channel group
    model = mesa.convert(copy.deepcopy(ref), mesa.MesaPolicy(exclude=()))
    x = torch.randn(4, 8, 2, 2)
    g = torch.randn(4, 16, 1, 1, generator=torch.Generator().manual_seed(1))
    grads = []
    for m in (ref, model):
        xi = x.clone().requires_grad_()
        m(xi).backward(g)
        grads.append((xi.grad, m[0].weight.grad, m[0].bias.grad))
    (gx_ref, gw_ref, _), (gx, gw, gb) = grads
    assert float(gb.norm()) < 1e-5 * float(gw.norm())
    assert float((gx - gx_ref).norm() / gx_ref.norm()) < 0.05
    assert float((gw - gw_ref).norm() / gw_ref.norm()) < 0.05


@pytest.mark.parametrize(
    "fn", [F.gelu, lambda x: F.gelu(x, approximate="tanh"), F.silu], ids=["gelu", "tanh", "silu"]
)
def test_gradcheck_activations(fn: Callable[[Tensor], Tensor]) -> None:
    _gradcheck(fn, grid((2, 3, 16), "channels", 5))


@pytest.mark.parametrize("act", ["gelu:none", "gelu:tanh", "silu"])
def test_linear_after_an_activation_rebuilds_its_input_from_the_activation_codes(
    act: str,
) -> None:
    """``linear(gelu(x))``: the linear layer saves no codes of its own; backward applies the
    activation to the GELU's input codes. On grid inputs (exact codes) the gradients are exact,
    which they would not be if the activation were not applied."""
    fn = F.silu if act == "silu" else lambda x: F.gelu(x, approximate=act[5:])
    w, b = torch.randn(5, 16, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    _gradcheck(lambda x, w, b: F.linear(fn(x), w, b), grid((2, 3, 16), "channels", 8), w, b)
    module = mesa.convert(Call(lambda x, w: F.linear(fn(x), w)), EXACT)
    module(grid((2, 3, 16), "channels", 8).requires_grad_(), w.requires_grad_())
    slots = {s.kind: s for s in mesa.summary(module).slots}
    assert slots["linear"].rebuilt == act and slots["linear"].quantised_bytes == 0
    assert slots[act.split(":")[0]].quantised_bytes > 0
    assert "mesa_linear0_input" not in mesa.running_estimates(module)


def test_linear_after_layer_norm_rebuilds_its_input_from_the_norm_codes() -> None:
    """``linear(layer_norm(x))``: the linear layer's input is rebuilt in backward as the norm's
    normalised codes times its weight plus its bias (exact gradients on inputs whose normalised
    values are on the grid), also when autocast casts the float32 norm output to bf16."""
    ln = lambda x, w, b, W: F.linear(F.layer_norm(x, (16,), w, b, 1e-6), W)  # noqa: E731
    x = normalised_grid(6, 3).reshape(2, 3, 16)
    w, b, W = torch.randn(16).double(), torch.randn(16).double(), torch.randn(5, 16).double()
    _gradcheck(ln, x, w, b, W)
    module = mesa.convert(Call(ln), EXACT)
    module(x, w.requires_grad_(), b.requires_grad_(), W.requires_grad_())
    slots = {s.kind: s for s in mesa.summary(module).slots}
    assert slots["linear"].rebuilt == "layer_norm" and slots["linear"].quantised_bytes == 0
    grads = []
    for m in (Call(ln), mesa.convert(Call(ln), EXACT)):
        params = [t.float().detach().requires_grad_() for t in (w, b, W)]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = m(x.float(), *params)
        assert y.dtype == torch.bfloat16
        y.float().square().sum().backward()
        grads.append([p.grad for p in params])
    for got, ref in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(got, ref, rtol=2e-2, atol=1e-2 * float(ref.abs().max()))
    (linear,) = [s for s in mesa.summary(m).slots if s.kind == "linear"]
    # recorded as what the linear layer takes: the bf16 cast of the float32 norm output
    assert linear.dtype == torch.bfloat16 and linear.original_bytes == x.numel() * 2


def test_layer_norm_rebuild_with_a_multi_dimensional_normalized_shape() -> None:
    """``LayerNorm([3, 16])`` (weight and bias ``[3, 16]``) before a linear layer: the codes
    are grouped along the last dimension but the affine map is not per channel, so it is
    applied after dequantising (folding it in crashed: a 48-element weight reshaped to the
    channel groups). Gradients within 8-bit quantisation error of the exact ones."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(64, 3, 16, generator=g, dtype=torch.float64)
    w = torch.randn(3, 16, generator=g, dtype=torch.float64)
    b = torch.randn(3, 16, generator=g, dtype=torch.float64)
    W = torch.randn(5, 16, generator=g, dtype=torch.float64)
    fn = lambda x, w, b, W: F.linear(F.layer_norm(x, (3, 16), w, b, 1e-6), W)  # noqa: E731
    module = mesa.convert(Call(fn), EXACT)
    module(x, w.requires_grad_(), b.requires_grad_(), W.requires_grad_()).square().sum().backward()
    (linear,) = [s for s in mesa.summary(module).slots if s.kind == "linear"]
    assert linear.rebuilt == "layer_norm"
    ref = [t.detach().clone().requires_grad_() for t in (w, b, W)]
    fn(x, *ref).square().sum().backward()
    for got, want in zip((w, b, W), ref, strict=True):
        rel = float((got.grad - want.grad).norm() / want.grad.norm())
        assert rel < 0.02, rel


def test_layer_norm_rebuild_with_other_groupings_and_without_affine() -> None:
    """The rebuilt layer-norm output when the codes are not grouped along the normalised
    dimension (a 4-D ``[B, H, W, C]`` input: grouped along dimension 1) and without affine
    parameters: exact gradients on per-row grid inputs."""
    x = normalised_grid(8, 4).reshape(2, 2, 2, 16)
    W = torch.randn(5, 16).double()
    _gradcheck(lambda x, W: F.linear(F.layer_norm(x, (16,), eps=1e-6), W), x, W)
    w, b = torch.randn(16).double(), torch.randn(16).double()
    _gradcheck(lambda x, w, b, W: F.linear(F.layer_norm(x, (16,), w, b, 1e-6), W), x, w, b, W)


def test_an_activation_output_changed_in_place_is_quantised_not_rebuilt() -> None:
    """``gelu(x).mul_(2)`` before the linear layer: the codes of ``x`` no longer describe the
    linear's input (its version moved), so the linear quantises the input itself."""
    g = torch.Generator().manual_seed(9)
    x = torch.randn(64, 16, generator=g, dtype=torch.float64)
    w = torch.randn(5, 16, generator=g, dtype=torch.float64, requires_grad=True)
    module = mesa.convert(Call(lambda x, w: F.linear(F.gelu(x).mul_(2), w)), EXACT)
    module(x.requires_grad_(), w).square().sum().backward()
    slots = {s.kind: s for s in mesa.summary(module).slots}
    assert slots["linear"].rebuilt == "" and slots["linear"].quantised_bytes > 0
    w_ref = w.detach().clone().requires_grad_()
    F.linear(F.gelu(x.detach()) * 2, w_ref).square().sum().backward()
    rel = float((w.grad - w_ref.grad).norm() / w_ref.grad.norm())
    assert rel < 0.01, rel  # 8-bit codes of 2·gelu(x), not gelu(x̂) (off by a factor of 2)


def test_gradcheck_matmul() -> None:
    _gradcheck(
        lambda a, b: a @ b.transpose(-2, -1),
        grid((2, 3, 4, 5), "heads", 6),
        grid((2, 3, 6, 5), "heads", 7),
    )


@pytest.mark.parametrize("causal", [False, True])
def test_gradcheck_sdpa(causal: bool) -> None:
    q, k, v = (grid((1, 2, 4, 3), "heads", s) for s in (8, 9, 10))
    if causal:
        _gradcheck(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), q, k, v)
    else:  # with a learnable additive bias (relative position bias) broadcast over the batch
        _gradcheck(
            lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=0.3),
            q,
            k,
            v,
            torch.randn(2, 4, 4),
        )


def _relative_errors(
    module: nn.Module, inputs: list[Tensor], seed: int = 0
) -> tuple[bool, dict[str, float]]:
    """Forward equality and relative gradient errors of a converted copy vs the original."""
    ref = module
    conv = mesa.convert(copy.deepcopy(module))
    xs_ref = [x.clone().requires_grad_(x.is_floating_point()) for x in inputs]
    xs_mesa = [x.clone().requires_grad_(x.is_floating_point()) for x in inputs]
    torch.manual_seed(seed)
    out_ref = ref(*xs_ref)
    torch.manual_seed(seed)
    out_mesa = conv(*xs_mesa)
    equal = torch.equal(out_ref, out_mesa)
    g = torch.randn(out_ref.shape, generator=torch.Generator().manual_seed(seed + 1))
    out_ref.backward(g)
    out_mesa.backward(g)
    errors = {}
    pairs = [(f"input{i}", a.grad, b.grad) for i, (a, b) in enumerate(zip(xs_ref, xs_mesa))]
    pairs += [
        (n, p.grad, q.grad)
        for (n, p), q in zip(ref.named_parameters(), conv.parameters(), strict=True)
    ]
    for name, a, b in pairs:
        if a is not None:
            assert b is not None
            errors[name] = float((a - b).norm() / a.norm())
    return equal, errors


def _attn_logits() -> Tensor:
    return torch.randn(2, 3, 12, 12) * 3


CASES: dict[str, tuple[Callable[[], nn.Module], Callable[[], list[Tensor]], float]] = {
    "linear": (lambda: nn.Linear(32, 24), lambda: [torch.randn(4, 10, 32)], 0.03),
    "conv": (
        lambda: nn.Conv2d(8, 6, 3, stride=2, padding=1, groups=2),
        lambda: [torch.randn(2, 8, 9, 9)],
        0.03,
    ),
    "conv_same": (
        lambda: nn.Conv2d(8, 6, 3, padding="same"),
        lambda: [torch.randn(2, 8, 9, 9)],
        0.03,
    ),
    "layer_norm": (lambda: nn.LayerNorm(32), lambda: [torch.randn(4, 10, 32) * 2 + 1], 0.03),
    "batch_norm": (lambda: nn.BatchNorm2d(8), lambda: [torch.randn(4, 8, 5, 5)], 0.03),
    "gelu": (nn.GELU, lambda: [torch.randn(4, 10, 32) * 2], 0.03),
    "silu": (nn.SiLU, lambda: [torch.randn(4, 10, 32) * 2], 0.03),
    # softmax outputs are heavy-tailed: one range per head leaves few codes for small values
    "softmax": (lambda: nn.Softmax(dim=-1), lambda: [_attn_logits()], 0.1),
    "matmul": (
        lambda: Call(lambda a, b: a @ b.transpose(-2, -1)),
        lambda: [torch.randn(2, 3, 12, 8), torch.randn(2, 3, 12, 8)],
        0.03,
    ),
    "sdpa": (
        lambda: Call(lambda q, k, v: F.scaled_dot_product_attention(q, k, v)),
        lambda: [
            torch.randn(2, 3, 12, 8) * 2,
            torch.randn(2, 3, 12, 8) * 2,
            torch.randn(2, 3, 12, 8),
        ],
        0.05,
    ),
    "sdpa_dropout": (
        lambda: Call(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, dropout_p=0.3)),
        lambda: [torch.randn(2, 3, 12, 8), torch.randn(2, 3, 12, 8), torch.randn(2, 3, 12, 8)],
        0.05,
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_backward_error_bounds(name: str) -> None:
    make, inputs, bound = CASES[name]
    torch.manual_seed(0)
    equal, errors = _relative_errors(make(), inputs())
    assert equal, "forward output is not bit-identical"
    assert errors and max(errors.values()) < bound, errors
    assert min(errors.values()) >= 0.0


def test_relu_mask_is_lossless() -> None:
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(16, 16), nn.ReLU(inplace=True), Call(torch.relu))
    equal, errors = _relative_errors(module, [torch.randn(4, 16)])
    # the 1-bit mask is exact: only the linear input is quantised (weight gradient)
    assert equal and errors["input0"] == 0.0 and errors["0.bias"] == 0.0
    assert errors["0.weight"] < 0.03


def test_passthrough_without_grad_and_for_broadcast_matmul() -> None:
    module = mesa.convert(Call(lambda a, b: torch.softmax(a @ b, dim=-1)))
    a, b = torch.randn(2, 3, 4, 5), torch.randn(5, 4)  # broadcasting matmul: left alone
    with torch.no_grad():
        module(a, b)
    assert not mesa.summary(module).slots and not list(module.buffers())
    module(a.requires_grad_(), b)
    assert mesa.summary(module).counts() == {"softmax": 1}


def test_bf16_autocast_ops_match() -> None:
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.LayerNorm(64), nn.Linear(64, 8))
    conv = mesa.convert(copy.deepcopy(module))
    x = torch.randn(6, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_ref, y_mesa = module(x), conv(x)
    assert y_ref.dtype == torch.bfloat16 and torch.equal(y_ref, y_mesa)
    y_ref.float().sum().backward()
    y_mesa.float().sum().backward()
    for p, q in zip(module.parameters(), conv.parameters(), strict=True):
        assert q.grad is not None and q.grad.dtype == p.dtype
        assert float((p.grad - q.grad).norm() / p.grad.norm()) < 0.05


AUTOCAST_CASES: dict[str, Callable[[], tuple[nn.Module, list[Tensor]]]] = {
    "conv": lambda: (nn.Conv2d(8, 6, 3, padding=1), [torch.randn(2, 8, 6, 6)]),
    "batch_norm": lambda: (nn.BatchNorm2d(8), [torch.randn(4, 8, 3, 3)]),
    "avg_pool": lambda: (Call(lambda x: F.avg_pool3d(x, 2)), [torch.randn(2, 3, 4, 4, 4)]),
    "matmul_softmax": lambda: (
        Call(lambda a, b: torch.softmax(a @ b.transpose(-2, -1), -1) @ b),
        [torch.randn(2, 3, 8, 16), torch.randn(2, 3, 8, 16)],
    ),
    "sdpa": lambda: (
        Call(lambda q, k, v: F.scaled_dot_product_attention(q, k, v)),
        [torch.randn(2, 3, 8, 16) for _ in range(3)],
    ),
    "relu_silu": lambda: (
        nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.SiLU()),
        [torch.randn(4, 16)],
    ),
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", list(AUTOCAST_CASES))
def test_autocast_forward_is_bit_identical(name: str, dtype: torch.dtype) -> None:
    """Under CPU autocast every Mesa op casts its inputs as autocast casts the original op
    (the policy probed per op family), so outputs and their dtypes are unchanged, and the
    parameters' gradients keep the parameters' dtype."""
    torch.manual_seed(0)
    module, inputs = AUTOCAST_CASES[name]()
    conv = mesa.convert(copy.deepcopy(module), mesa.MesaPolicy(exclude=()))
    xs = [x.requires_grad_() for x in inputs]
    with torch.autocast("cpu", dtype=dtype):
        y_ref, y_mesa = module(*xs), conv(*xs)
    assert y_ref.dtype == y_mesa.dtype and torch.equal(y_ref, y_mesa)
    assert mesa.summary(conv).slots or name == "avg_pool"
    y_mesa.float().sum().backward()
    for p in conv.parameters():
        assert p.grad is not None and p.grad.dtype == p.dtype
