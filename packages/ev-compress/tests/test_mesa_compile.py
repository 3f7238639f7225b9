"""``torch.compile`` of converted models: every Mesa op is an ``ev_mesa`` custom op (checked by
``torch.library.opcheck``), and a converted ViT compiles with ``fullgraph=True`` into one graph
whose outputs, gradients and running estimates equal eager Mesa's."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ev_compress import mesa
from ev_compress.mesa.ops import _library  # noqa: F401  (registers torch.ops.ev_mesa)

OPS = torch.ops.ev_mesa


def _qargs(groups: int, dim: int, *, update: bool = True) -> tuple[Any, ...]:
    """Quantising arguments: fresh (NaN) estimates, a seed, salt 5, 8 bits, momentum 0.9."""
    nan = torch.full((groups,), math.nan)
    return (nan, nan.clone(), torch.tensor(3), 5, dim, groups, 8, 0.9, update, True)


def _codes(x: Tensor, dim: int, groups: int) -> tuple[Tensor, Tensor, Tensor]:
    return OPS.quantize(x.detach(), *_qargs(groups, dim))


def _samples() -> dict[str, list[tuple[Any, ...]]]:
    g = torch.Generator().manual_seed(0)

    def r(*shape: int, grad: bool = True) -> Tensor:
        return torch.randn(*shape, generator=g).requires_grad_(grad)

    x3, x4 = r(2, 3, 8), r(2, 4, 5, 5)
    w, b = r(6, 8), r(6)
    cw, cb = r(6, 2, 3, 3), r(6)
    q, k, v = r(1, 2, 4, 8), r(1, 2, 6, 8), r(1, 2, 6, 8)
    bias = r(2, 4, 6)
    return {
        "quantize": [
            (r(2, 3, 8, grad=False), *_qargs(4, 2)),
            (r(2, 4, 5, 5, grad=False).transpose(2, 3), *_qargs(2, 1)),  # non-contiguous
            # set estimates, no update, 3 bits, round to nearest
            (
                r(4, 8, grad=False),
                torch.rand(8) + 0.5,
                torch.randn(8),
                torch.tensor(1),
                0,
                1,
                8,
                3,
                0.5,
                False,
                False,
            ),
        ],
        "dequantize": [(*_codes(x3, 2, 4), [2, 3, 8], torch.float32)],
        "linear": [
            (x3, w, b, *_codes(x3, 2, 4), None, "", None, None),
            (x3, w.detach(), None, None, None, None, None, "", None, None),  # no codes needed
            (x3.bfloat16(), w, b, *_codes(x3.bfloat16(), 2, 4), torch.bfloat16, "", None, None),
            (x3, w, b, *_codes(x3, 2, 4), None, "gelu:tanh", None, None),  # from GELU codes
            (x3.bfloat16(), w, b, *_codes(x3, 2, 4), torch.bfloat16, "layer_norm", r(8), r(8)),
        ],
        "conv": [(x4, cw, cb, *_codes(x4, 1, 2), [2, 2], [1, 1], [1, 1], 2, None)],
        "layer_norm": [(x3, r(8), r(8), [8], 1e-6, *_qargs(4, 2))],
        "batch_norm": [
            (x4, r(4), r(4), torch.zeros(4), torch.ones(4), True, 0.1, 1e-5, *_qargs(4, 1)),
            (x4, None, None, None, None, True, 0.1, 1e-5, *_qargs(2, 1)),
            (x4, r(4), None, torch.zeros(4), torch.ones(4) * 2, False, 0.1, 1e-5, *_qargs(4, 1)),
        ],
        "gelu": [(x3, *_codes(x3, 2, 4), "tanh")],
        "silu": [(x3, *_codes(x3, 2, 4))],
        "relu": [(x3,), (x4.transpose(1, 3),)],
        "softmax": [(x4, -1, *_qargs(4, 1))],
        "matmul": [(x4, r(2, 4, 5, 3), *_codes(x4, 1, 4), *_codes(r(2, 4, 5, 3), 1, 4))],
        "sdpa": [
            (
                q,
                k,
                v,
                None,
                *_codes(q, 1, 2),
                *_codes(k, 1, 2),
                *_codes(v, 1, 2),
                0.0,
                False,
                None,
                False,
            ),
            (
                q,
                k,
                v,
                bias,
                *_codes(q, 1, 2),
                *_codes(k, 1, 2),
                *_codes(v, 1, 2),
                0.0,
                False,
                0.3,
                False,
            ),
        ],
        "avg_pool": [
            (x4, 2, [2, 2], [], [0, 0], True, False, None),
            (x3, 1, [3], [2], [1], False, True, None),
        ],
        "dropout": [(x3, 0.3)],
    }


@pytest.mark.parametrize("name", list(_samples()))
def test_opcheck_every_custom_op(name: str) -> None:
    """Schema (declared mutations), fake kernel (shapes, dtypes, strides), autograd registration
    and AOT dispatch of each ``ev_mesa`` op; ops drawing from the global generator skip the
    checks that compare two runs."""
    utils: tuple[str, ...] = (
        "test_schema",
        "test_autograd_registration",
        "test_faketensor",
        "test_aot_dispatch_static",
    )
    if name == "dropout":
        utils = utils[:3]
    for args in _samples()[name]:
        torch.library.opcheck(getattr(OPS, name), args, test_utils=utils)


def test_every_handled_op_is_a_custom_op() -> None:
    """What the eager path compresses through handlers is exactly what ``ev_mesa`` provides."""
    from ev_compress.mesa.ops import HANDLERS

    kinds = {k for k, _ in HANDLERS.values()}
    ops = {"matmul", "linear", "conv", "layer_norm", "batch_norm", "gelu", "silu", "relu"}
    ops |= {"softmax", "sdpa", "avg_pool", "dropout"}
    assert kinds == ops
    for name in ops | {"quantize", "dequantize"}:
        assert torch.Tag.pt2_compliant_tag in getattr(OPS, name).default.tags


def _vit() -> nn.Module:
    import timm

    torch.manual_seed(0)
    return timm.create_model(
        "vit_small_patch16_224", depth=2, img_size=32, patch_size=8, num_classes=10
    )


def _train(
    model: nn.Module, run: Callable[[Tensor], Tensor], steps: int, amp: bool = False
) -> list[tuple[Tensor, dict[str, Tensor]]]:
    """Outputs and gradients of ``steps`` SGD steps on fixed random batches."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    out = []
    for step in range(steps):
        x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(step))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            y = run(x)
        F.cross_entropy(y.float(), torch.arange(4)).backward()
        out.append((y.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
        opt.step()
        opt.zero_grad(set_to_none=True)
    return out


def _assert_same_training(eager: nn.Module, compiled: nn.Module, runs: Any, exact: bool) -> None:
    for (y_e, g_e), (y_c, g_c) in zip(*runs, strict=True):
        if exact:
            assert torch.equal(y_e, y_c)
        else:
            torch.testing.assert_close(y_c, y_e, rtol=1e-4, atol=1e-5)
        for name, ge in g_e.items():
            torch.testing.assert_close(g_c[name], ge, rtol=1e-4, atol=1e-6, msg=name)
    est_e, est_c = mesa.running_estimates(eager), mesa.running_estimates(compiled)
    # 7 quantised operands per block (the inputs of qkv, fc1 and fc2 are rebuilt from the codes
    # of norm1, norm2 and the GELU: no estimates of their own), 2 blocks, plus the final norm
    assert est_e.keys() == est_c.keys() and len(est_e) == 2 * 7 + 2
    for name, (rng, mn) in est_e.items():
        # the running estimates move exactly as in eager (bit-equal with aot_eager)
        close = torch.equal if exact else torch.allclose
        assert close(est_c[name][0], rng) and close(est_c[name][1], mn), name
    ctx_e, ctx_c = eager.__dict__["_mesa_context"], compiled.__dict__["_mesa_context"]
    assert int(ctx_e.counter) == int(ctx_c.counter) == len(runs[0])


@pytest.mark.slow
def test_fullgraph_vit_matches_eager_mesa() -> None:
    """A converted ViT-S (2 blocks, 32² input) under ``torch.compile(fullgraph=True,
    backend="aot_eager")``: 3 training steps give bit-identical outputs, gradients equal to
    eager Mesa's and the same running estimates, from one graph compiled once (a fake-tensor
    forward creates the estimates before the first compilation reads them)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    eager, compiled = mesa.convert(_vit()), mesa.convert(_vit())
    counter = CompileCounterWithBackend("aot_eager")
    fn = torch.compile(compiled, fullgraph=True, backend=counter)
    runs = (_train(eager, eager, 3), _train(compiled, fn, 3))
    _assert_same_training(eager, compiled, runs, exact=True)
    assert counter.frame_count == 1  # one graph (fullgraph: no breaks), no re-trace
    # the compiled graph keeps the codes only: what eager Mesa keeps, ~1/4 of the baseline
    x = torch.randn(4, 3, 32, 32)
    kept = []
    for model, run in ((_vit(), None), (eager, eager), (compiled, fn)):
        with mesa.SavedTensorMeter(model.parameters(), activations_only=True) as meter:
            (model if run is None else run)(x)
        kept.append(meter.total_bytes)
    assert kept[2] == kept[1] < 0.3 * kept[0], kept
    # the saved-tensor hooks stay off in the compiled graph; summary needs an eager forward
    assert not mesa.summary(compiled).slots


class _Broken(nn.Module):
    """A model whose forward breaks the graph between two compressed ops."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(16, 32), nn.Linear(32, 8)

    def forward(self, x: Tensor) -> Tensor:
        h = F.gelu(self.a(x))
        torch._dynamo.graph_break()
        return self.b(h)


def test_graph_break_inside_a_converted_model() -> None:
    """``torch.compile`` without ``fullgraph`` across a graph break: the Mesa state carries over
    (same outputs, gradients and estimates as eager Mesa) and no mode is left on the stack."""
    from torch.overrides import _get_current_function_mode_stack

    torch._dynamo.reset()
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(mesa.convert(_Broken()))
    eager, compiled = models
    fn = torch.compile(compiled, backend="aot_eager")
    for step in range(3):
        x = torch.randn(64, 16, generator=torch.Generator().manual_seed(step))
        y_c, y_e = fn(x), eager(x)
        y_c.square().sum().backward()
        y_e.square().sum().backward()
        assert torch.equal(y_c, y_e)
        for p, q in zip(eager.parameters(), compiled.parameters(), strict=True):
            assert torch.equal(p.grad, q.grad)
    assert not _get_current_function_mode_stack()
    est_e, est_c = mesa.running_estimates(eager), mesa.running_estimates(compiled)
    assert (
        est_e.keys()
        == est_c.keys()
        == {"a.mesa_linear0_input", "mesa_gelu0_input"}  # b's input: rebuilt from the GELU's
    )
    for name, (rng, mn) in est_e.items():
        assert torch.equal(est_c[name][0], rng) and torch.equal(est_c[name][1], mn), name


@pytest.mark.slow
def test_inductor_bf16_autocast_block_matches_eager_mesa() -> None:
    """A converted ViT block (the top-level module) compiled by inductor under bf16 autocast,
    after one eager step (compiled and eager runs then start from the same estimates). Inductor
    fuses the
    element-wise ops around the Mesa ops, so outputs and gradients match eager Mesa to bf16
    rounding and the estimates to a few ulps of their inputs. (Inductor's fixed start-up cost
    on 2 CPU cores, ~20 s, is why this is one block; the whole ViT runs with aot_eager above.)"""
    from timm.models.vision_transformer import Block

    torch._dynamo.reset()
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(mesa.convert(Block(64, 2)))
    eager, compiled = models
    fn = torch.compile(compiled, fullgraph=True)
    grads: list[list[Tensor]] = [[], []]
    outs: list[list[Tensor]] = [[], []]
    for step in range(3):
        x = torch.randn(4, 17, 64, generator=torch.Generator().manual_seed(step))
        for i, (model, run) in enumerate(((eager, eager), (compiled, fn if step else compiled))):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = run(x)
            y.float().square().mean().backward()
            outs[i].append(y.detach().float())
            grads[i].append(torch.cat([p.grad.flatten() for p in model.parameters()]).double())
            model.zero_grad(set_to_none=True)
    for y_e, y_c, g_e, g_c in zip(outs[0], outs[1], grads[0], grads[1], strict=True):
        torch.testing.assert_close(y_c, y_e, rtol=1.6e-2, atol=1e-2)
        assert float(g_e @ g_c / (g_e.norm() * g_c.norm())) > 0.999
    for name, (rng, mn) in mesa.running_estimates(eager).items():
        rng_c, mn_c = mesa.running_estimates(compiled)[name]
        torch.testing.assert_close(rng_c, rng, rtol=1e-2, atol=1e-3, msg=name)
        torch.testing.assert_close(mn_c, mn, rtol=1e-2, atol=1e-3, msg=name)
    # inductor's partitioner keeps the codes, no full-precision activation
    x = torch.randn(4, 17, 64)
    kept = []
    for model, run in ((eager, eager), (compiled, fn)):
        with (
            torch.autocast("cpu", dtype=torch.bfloat16),
            mesa.SavedTensorMeter(model.parameters(), activations_only=True) as meter,
        ):
            run(x)
        kept.append(meter.by_dtype)
    assert kept[1]["uint8"] == kept[0]["uint8"] > 0, kept
    assert sum(kept[1].values()) <= sum(kept[0].values()), kept


class _InplaceAfterGelu(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16)
        self.drop = nn.Dropout(0.5, inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        h = self.drop(self.act(self.fc1(x)))
        h.mul_(3.0)
        return self.fc2(h)


def test_compiled_in_place_changes_stop_the_rebuild() -> None:
    """Compiled graphs have no version counters: an in-place call (``inplace=True`` dropout,
    ``mul_``) after the GELU makes ``fc2`` quantise its real input instead of rebuilding it
    from the GELU's codes (which missed the mask and the factor: gradient error 0.67 before)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    plain = _InplaceAfterGelu().double()
    x = torch.randn(64, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    exact = mesa.MesaPolicy(momentum=0.0, stochastic_rounding=False)
    grads = {}
    for name in ("plain", "eager", "compiled"):
        m = copy.deepcopy(plain)
        if name != "plain":
            m = mesa.convert(m, exact)
        run = torch.compile(m, backend="aot_eager") if name == "compiled" else m
        torch.manual_seed(1)  # the same dropout mask in every run
        run(x).square().sum().backward()
        grads[name] = m.fc2.weight.grad
    for name in ("eager", "compiled"):
        rel = float((grads[name] - grads["plain"]).norm() / grads["plain"].norm())
        assert rel < 0.02, (name, rel)
