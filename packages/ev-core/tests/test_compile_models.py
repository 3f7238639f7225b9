"""``ev_core.models.compile_model``: one graph for every batch size, outputs equal to eager; and
the compile-time formulations of the layers (shifted-tap depth-wise conv, GEMM offset conv)
against the convolutions they replace."""

from __future__ import annotations

from typing import Any

import pytest
import timm
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

import ev_core  # noqa: F401  (registers the models)
from ev_core.errors import EvError
from ev_core.layers.dtm import DeformConv2x2
from ev_core.layers.mlp import depthwise_conv_nhwc
from ev_core.models import CompiledModel, compile_model
from ev_testing import assert_close

TINY: dict[str, Any] = dict(img_size=64, embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 2, 4, 8],
                            alpha=0.5, local_ws=[0, 0, 2, 1], num_classes=10)  # fmt: skip


def _tiny_litv2() -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model("litv2_s", **TINY).eval()
    with torch.no_grad():  # trained DTMs have non-zero offsets: exercise the sampling
        for name, p in model.named_parameters():
            if "conv_offset" in name:
                p.normal_(0, 0.5)
    return model


def _no_recompiles(compiled: CompiledModel, model: torch.nn.Module, sizes: list[int],
                   dtype: torch.dtype | None = None) -> None:  # fmt: skip
    """First size compiles; every later size must reuse the graph (dynamo raises otherwise);
    every output equals eager."""
    amp = torch.autocast("cpu", dtype=dtype) if dtype else torch.autocast("cpu", enabled=False)
    for i, b in enumerate(sizes):
        x = torch.randn(b, 3, 64, 64)
        with torch._dynamo.config.patch(error_on_recompile=i > 0), amp:
            out = compiled(x)
        with torch.no_grad(), amp:
            ref = model(x)
        assert out.shape == (b, 10)
        if dtype is None:
            assert_close(out, ref)
        else:
            assert_close(out.float(), ref.float(), atol=5e-2, rtol=5e-2)


def test_one_graph_for_batch_1_8_32() -> None:
    """Batch 8 compiles; 1 and 32 run on the same graph (``error_on_recompile``), and dynamo
    captured exactly one graph; outputs equal eager. ``aot_eager`` traces the same graph as
    inductor (fake tensors, decompositions) without generating code."""
    torch._dynamo.reset()
    counters.clear()
    model = _tiny_litv2()
    compiled = compile_model(model, backend="aot_eager")
    _no_recompiles(compiled, model, [8, 1, 32])
    assert counters["stats"]["unique_graphs"] == 1
    # under bf16 autocast: one more graph (autocast is guarded), then no recompile either
    _no_recompiles(compiled, model, [8, 1], torch.bfloat16)
    assert counters["stats"]["unique_graphs"] == 2


@pytest.mark.slow
def test_inductor_freezing_one_graph() -> None:
    """The real recipe (inductor, freezing): batch 2 compiles, 1 and 5 reuse the graph
    (inductor's own lowering of views guarded on batch > 1 where ``aot_eager`` did not)."""
    torch._dynamo.reset()
    counters.clear()
    model = _tiny_litv2()
    _no_recompiles(compile_model(model), model, [2, 1, 5])
    if torch.backends.mkldnn.is_available():  # freezing ran: weights packed for oneDNN GEMMs
        assert counters["inductor"]["mkldnn_linear_weight_pack_matcher_count"] > 0


def test_compile_model_modes_and_state() -> None:
    model = _tiny_litv2().train()
    compiled = compile_model(model, backend="aot_eager")
    assert not model.training  # inference mode puts the model in eval mode
    assert set(compiled.state_dict()) == {f"model.{k}" for k in model.state_dict()}
    with pytest.raises(EvError, match="mode must be one of"):
        compile_model(model, mode="fast")
    # freezing: inductor inference only, unless the options say otherwise
    assert compile_model(model).freezing and not compiled.freezing
    assert not compile_model(model, options={"freezing": False}).freezing
    assert not compile_model(model, "training").freezing
    torch._dynamo.reset()
    train = compile_model(model.train(), "training", backend="aot_eager")
    out = train(torch.randn(2, 3, 64, 64))
    assert out.requires_grad
    out.sum().backward()
    assert model.head.weight.grad is not None


def test_training_gradients_equal_eager() -> None:
    """``mode="training"``: the compiled backward gives eager's gradient for every parameter.
    In fp32, the dtype oneDNN's fused depth-wise conv would take: that op has no autograd
    kernel, so a graph that needs gradients must not hold it (else the ConvFFN parameters and
    everything before them got no gradient). Eval mode: no stochastic depth, one function."""
    torch._dynamo.reset()
    model = _tiny_litv2()
    x = torch.randn(2, 3, 64, 64)
    model(x).square().sum().backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert len(ref) == len(list(model.parameters()))
    model.zero_grad()
    compile_model(model, "training", backend="aot_eager")(x).square().sum().backward()
    for n, p in model.named_parameters():
        assert p.grad is not None, n
        assert_close(p.grad, ref[n], rtol=1e-3, atol=1e-4 * ref[n].abs().max().item(), msg=n)


@pytest.mark.parametrize("k", [3, 5])
@pytest.mark.parametrize("bias", [True, False])
def test_depthwise_taps_equal_conv(k: int, bias: bool) -> None:
    g = torch.Generator().manual_seed(k)
    x = torch.randn(2, 7, 6, 5, generator=g, dtype=torch.float64)
    w = torch.randn(5, 1, k, k, generator=g, dtype=torch.float64)
    b = torch.randn(5, generator=g, dtype=torch.float64) if bias else None
    ref = F.conv2d(x.permute(0, 3, 1, 2), w, b, padding=k // 2, groups=5).permute(0, 2, 3, 1)
    assert_close(depthwise_conv_nhwc(x, w, b), ref)
    with pytest.raises(ValueError, match="odd square"):
        depthwise_conv_nhwc(x, torch.randn(5, 1, 2, 2, dtype=torch.float64), None)
    with pytest.raises(ValueError, match="odd square"):
        depthwise_conv_nhwc(x[..., :4], w, b)


@pytest.mark.parametrize("hw", [(8, 6), (7, 9)])
def test_offset_gemm_equals_offset_conv(hw: tuple[int, int]) -> None:
    torch.manual_seed(0)
    conv = DeformConv2x2(6, 10).double()
    with torch.no_grad():
        conv.conv_offset.weight.normal_()
        conv.conv_offset.bias.normal_()
    x = torch.randn(2, *hw, 6, dtype=torch.float64)
    ref = conv.conv_offset(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)  # odd sizes floor
    assert_close(conv._offset_nhwc(x), ref)
