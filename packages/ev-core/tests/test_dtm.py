"""Deformable token merging: fast path vs the torchvision reference, conv equivalence, bf16."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import deform_conv2d

from ev_core.layers.dtm import DeformableTokenMerging, deform_merge_2x2, deform_merge_2x2_nhwc
from ev_testing import BaseTester, assert_close


def _inputs(
    H: int, W: int, dtype: torch.dtype, C: int = 3, out: int = 5, scale: float = 1.5
) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(H * 100 + W)
    x = torch.randn(2, C, H, W, generator=g, dtype=dtype)
    # offsets up to a few pixels: many samples fall partly or fully outside the map
    off = torch.randn(2, 8, H // 2, W // 2, generator=g, dtype=dtype) * scale
    w = torch.randn(out, C, 2, 2, generator=g, dtype=dtype)
    b = torch.randn(out, generator=g, dtype=dtype)
    return x, off, w, b


@pytest.mark.parametrize("recompute", [True, False], ids=["recompute", "autograd"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("hw", [(8, 8), (7, 9), (5, 6)])
def test_fast_matches_torchvision_forward_backward(
    dtype: torch.dtype, hw: tuple[int, int], recompute: bool
) -> None:
    inputs = [t.requires_grad_() for t in _inputs(*hw, dtype)]
    ref = deform_conv2d(inputs[0], inputs[1], inputs[2], inputs[3], stride=2)
    out = deform_merge_2x2(*inputs, recompute=recompute)
    assert out.shape == ref.shape == (2, 5, hw[0] // 2, hw[1] // 2)  # odd sizes floor
    assert_close(out, ref)
    grad = torch.randn_like(ref)
    g_ref = torch.autograd.grad(ref, inputs, grad)
    g_out = torch.autograd.grad(out, inputs, grad)
    for name, a, e in zip(("x", "offset", "weight", "bias"), g_out, g_ref, strict=True):
        assert_close(a, e, msg=f"grad of {name}")


def test_zero_offsets_equal_strided_conv() -> None:
    x, _, w, b = _inputs(6, 8, torch.float64)
    off = torch.zeros(2, 8, 3, 4, dtype=torch.float64)
    assert_close(deform_merge_2x2(x, off, w, b), F.conv2d(x, w, b, stride=2))
    x7 = torch.randn(1, 3, 7, 5, dtype=torch.float64)
    assert_close(
        deform_merge_2x2(x7, torch.zeros(1, 8, 3, 2, dtype=torch.float64), w, None),
        F.conv2d(x7, w, None, stride=2),
    )


def test_bf16_fast_path_matches_fp32_reference() -> None:
    x, off, w, b = _inputs(12, 10, torch.float32, C=16, out=32, scale=1.0)
    ref = deform_conv2d(x, off, w, b, stride=2)
    out = deform_merge_2x2(x.bfloat16(), off.bfloat16(), w.bfloat16(), b.bfloat16())
    assert out.dtype == torch.bfloat16
    # bf16 rounding of inputs and of the 64-term GEMM: scale the tolerance to the output range
    assert_close(out, ref, atol=0.05 * ref.abs().max().item(), rtol=0.05)


def test_gradcheck_fast_op() -> None:
    # offsets kept away from integers so bilinear weights are differentiable everywhere sampled
    x, off, w, b = _inputs(4, 6, torch.float64, C=2, out=3, scale=0.7)
    off = off + 0.25
    assert BaseTester.gradcheck(deform_merge_2x2, (x, off, w, b))


def test_module_paths_agree_and_start_as_patch_merging() -> None:
    torch.manual_seed(0)
    fast = DeformableTokenMerging(4, 8, path="fast").double()
    ref = DeformableTokenMerging(4, 8, path="torchvision").double()
    ref.load_state_dict(fast.state_dict())
    assert set(fast.state_dict()) == {
        "dconv.weight",
        "dconv.bias",
        "dconv.conv_offset.weight",
        "dconv.conv_offset.bias",
        "norm_layer.weight",
        "norm_layer.bias",
        "norm_layer.running_mean",
        "norm_layer.running_var",
        "norm_layer.num_batches_tracked",
    }
    assert torch.count_nonzero(fast.dconv.conv_offset.weight) == 0
    x = torch.randn(2, 7 * 9, 4, dtype=torch.float64)
    # fresh DTM = conv 2x2/s2 + BN (train mode: batch statistics) + GELU
    y, hw = fast(x, (7, 9))
    assert hw == (3, 4) and y.shape == (2, 12, 8)
    conv = F.conv2d(x.transpose(1, 2).reshape(2, 4, 7, 9), fast.dconv.weight, fast.dconv.bias, 2)
    mean = conv.mean(dim=(0, 2, 3), keepdim=True)
    var = conv.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
    expected = F.gelu((conv - mean) / torch.sqrt(var + 1e-5)).flatten(2).transpose(1, 2)
    assert_close(y, expected)
    # with learned offsets both paths agree, including gradients of the offset predictor
    with torch.no_grad():
        for m in (fast, ref):
            m.dconv.conv_offset.weight.copy_(torch.linspace(-0.5, 0.5, 8 * 4 * 4).view(8, 4, 2, 2))
    xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
    outs = [m(xi, (7, 9))[0] for m, xi in zip((fast, ref), xs, strict=True)]
    assert_close(outs[0], outs[1])
    outs[0].square().sum().backward()
    outs[1].square().sum().backward()
    assert_close(xs[0].grad, xs[1].grad)
    assert_close(fast.dconv.conv_offset.weight.grad, ref.dconv.conv_offset.weight.grad)
    assert_close(fast.dconv.weight.grad, ref.dconv.weight.grad)


def test_bad_inputs_raise() -> None:
    with pytest.raises(ValueError, match="path"):
        DeformableTokenMerging(4, 8, path="cuda")  # type: ignore[arg-type]
    x, off, w, b = _inputs(6, 6, torch.float32)
    with pytest.raises(ValueError, match="offset"):
        deform_merge_2x2(x, off[:, :, :2], w, b)
    with pytest.raises(ValueError, match="weight"):
        deform_merge_2x2(x, off, w[:, :2], b)
    with pytest.raises(ValueError, match="tokens"):
        DeformableTokenMerging(4, 8)(torch.randn(1, 10, 4), (3, 3))


# --- the recomputing backward (custom autograd function) against plain autograd ---------------

GRAD_NAMES = ("x", "offset", "weight", "bias")


def _grads(
    out: torch.Tensor, inputs: list[torch.Tensor], seed: int = 0
) -> tuple[torch.Tensor, ...]:
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.dtype)
    return torch.autograd.grad(out, [t for t in inputs if t.requires_grad], g)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_recompute_equals_plain_autograd(dtype: torch.dtype) -> None:
    base = _inputs(9, 8, dtype, C=6, out=7, scale=2.0)
    ins = [t.clone().requires_grad_() for t in base]
    ins_plain = [t.clone().requires_grad_() for t in base]
    out = deform_merge_2x2(*ins)
    plain = deform_merge_2x2(*ins_plain, recompute=False)
    assert torch.equal(out, plain)  # same forward kernels: bit-identical
    for name, a, e in zip(GRAD_NAMES, _grads(out, ins), _grads(plain, ins_plain), strict=True):
        assert_close(a, e, msg=f"grad of {name}")
    # any subset of inputs requiring grad (frozen weights, fixed offsets, ...)
    for mask in (
        (True, False, False, False),
        (False, True, False, False),
        (False, False, True, True),
    ):
        ins = [t.clone().requires_grad_(m) for t, m in zip(base, mask, strict=True)]
        ins_plain = [t.clone().requires_grad_(m) for t, m in zip(base, mask, strict=True)]
        got = _grads(deform_merge_2x2(*ins), ins)
        expected = _grads(deform_merge_2x2(*ins_plain, recompute=False), ins_plain)
        for a, e in zip(got, expected, strict=True):
            assert_close(a, e, msg=str(mask))


def test_gradgradcheck_recompute() -> None:
    """The recomputing backward is itself differentiable (double backward)."""
    x, off, w, b = _inputs(4, 4, torch.float64, C=2, out=2, scale=0.7)
    inputs = tuple(t.requires_grad_() for t in (x, off + 0.25, w, b))
    assert torch.autograd.gradgradcheck(deform_merge_2x2, inputs, eps=1e-6, atol=1e-5, rtol=1e-3)


def test_bf16_recompute_matches_plain_and_reference() -> None:
    x, off, w, b = _inputs(12, 10, torch.float32, C=16, out=32, scale=1.0)
    ref_in = [t.clone().requires_grad_() for t in (x, off, w, b)]
    ref = deform_conv2d(*ref_in[:3], ref_in[3], stride=2)
    ref_grads = _grads(ref, ref_in)
    ins = [t.bfloat16().requires_grad_() for t in (x, off, w, b)]
    ins_plain = [t.bfloat16().requires_grad_() for t in (x, off, w, b)]
    out = deform_merge_2x2(*ins)
    plain = deform_merge_2x2(*ins_plain, recompute=False)
    assert out.dtype == torch.bfloat16 and torch.equal(out, plain)
    got = _grads(out, ins)
    for name, a, e, r in zip(GRAD_NAMES, got, _grads(plain, ins_plain), ref_grads, strict=True):
        assert a.dtype == torch.bfloat16
        scale = r.abs().max().item()
        # recompute accumulates x's gradient in fp32, plain autograd in bf16: both are
        # bf16-close to each other and to the fp32 torchvision gradients
        assert_close(a, e, atol=0.02 * scale, rtol=0.02, msg=f"vs plain: grad of {name}")
        assert_close(a, r, atol=0.05 * scale, rtol=0.05, msg=f"vs torchvision: grad of {name}")


def test_recompute_under_autocast() -> None:
    """fp32 inputs under CPU bf16 autocast: the GEMM runs in bf16 on both paths, the gradients
    come back in the inputs' dtype."""
    base = _inputs(8, 10, torch.float32, C=8, out=16, scale=1.0)
    ins = [t.clone().requires_grad_() for t in base]
    ins_plain = [t.clone().requires_grad_() for t in base]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = deform_merge_2x2(*ins)
        plain = deform_merge_2x2(*ins_plain, recompute=False)
    assert out.dtype == torch.bfloat16 and torch.equal(out, plain)
    for name, a, e in zip(GRAD_NAMES, _grads(out, ins), _grads(plain, ins_plain), strict=True):
        assert a.dtype == torch.float32
        scale = e.abs().max().item()
        assert_close(a, e, atol=0.02 * scale, rtol=0.02, msg=f"grad of {name}")


def _saved_bytes(fn: Callable[[], object]) -> int:
    """Bytes of every tensor autograd packs for the backward while ``fn`` runs."""
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_recompute_saves_only_input_offset_weight(dtype: torch.dtype) -> None:
    B, H, W, C, O = 2, 16, 16, 16, 32  # noqa: E741
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, H, W, C, generator=g).to(dtype).requires_grad_()
    off = torch.randn(B, H // 2, W // 2, 8, generator=g).to(dtype).requires_grad_()
    w = torch.randn(O, C, 2, 2, generator=g).to(dtype).requires_grad_()
    b = torch.randn(O, generator=g).to(dtype).requires_grad_()
    e = x.element_size()
    n_out = B * (H // 2) * (W // 2)
    taps = n_out * 4 * C  # elements of the gathered [B, Ho, Wo, 4C] tap matrix (= x here)
    recompute = _saved_bytes(lambda: deform_merge_2x2_nhwc(x, off, w, b))
    plain = _saved_bytes(lambda: deform_merge_2x2_nhwc(x, off, w, b, recompute=False))
    # recompute: exactly x, offset and weight
    assert recompute == (B * H * W * C + n_out * 8 + O * C * 4) * e
    # plain autograd keeps at least x (the embedding_bag table), the gathered [B, Ho, Wo, 4C]
    # tap matrix (the GEMM input) and the tap-major weight copy, plus per tap and corner the
    # row index (int64), the bilinear factors (fp32), the validity mask (bool) and the weight
    # (asserted as a lower bound only: autograd internals)
    lower = (B * H * W * C + taps + 4 * C * O) * e + 4 * 4 * n_out * (8 + 4 + 4 + 1)
    assert plain >= lower
    assert recompute / plain < 0.5  # here 0.35 (fp32) / 0.26 (bf16)


def test_compile_fullgraph_forward_backward_recompute() -> None:
    """Dynamo traces the custom autograd function, forward and backward, without breaks."""
    torch._dynamo.reset()
    base = _inputs(8, 6, torch.float32, C=4, out=6)
    ins = [t.clone().permute(0, 2, 3, 1).requires_grad_() for t in base[:2]] + [
        t.clone().requires_grad_() for t in base[2:]
    ]
    eager_ins = [t.detach().clone().requires_grad_() for t in ins]
    compiled = torch.compile(deform_merge_2x2_nhwc, fullgraph=True, backend="aot_eager")
    out = compiled(*ins)
    expected = deform_merge_2x2_nhwc(*eager_ins)
    assert_close(out, expected)
    for name, a, e in zip(GRAD_NAMES, _grads(out, ins), _grads(expected, eager_ins), strict=True):
        assert_close(a, e, msg=f"grad of {name}")


def test_module_recompute_flag() -> None:
    torch.manual_seed(0)
    fast = DeformableTokenMerging(8, 16, path="fast")
    plain = DeformableTokenMerging(8, 16, path="fast", recompute=False)
    plain.load_state_dict(fast.state_dict())
    with torch.no_grad():
        for m in (fast, plain):
            m.dconv.conv_offset.weight.copy_(torch.linspace(-1, 1, 8 * 8 * 4).view(8, 8, 2, 2))
    x = torch.randn(2, 10 * 10, 8)
    xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
    saved = []
    outs = []
    for m, xi in zip((fast, plain), xs, strict=True):
        saved.append(_saved_bytes(lambda m=m, xi=xi: outs.append(m(xi, (10, 10))[0])))
    assert torch.equal(outs[0], outs[1])
    assert saved[0] < saved[1]
    outs[0].square().sum().backward()
    outs[1].square().sum().backward()
    assert_close(xs[0].grad, xs[1].grad)
    assert_close(fast.dconv.conv_offset.weight.grad, plain.dconv.conv_offset.weight.grad)


def test_auto_path_is_measured_once_and_correct() -> None:
    """``path="auto"`` times both paths on the first eager call per (device, dtype, channels),
    caches the winner and gives that path's result; a path without a kernel for the dtype
    (torchvision has no bf16 CPU deform_conv2d) is never chosen."""
    from ev_core.layers.dtm import DTM_PATH_CACHE

    DTM_PATH_CACHE.clear()
    torch.manual_seed(0)
    dtm = DeformableTokenMerging(8, 16).eval()
    with torch.no_grad():
        dtm.dconv.conv_offset.weight.normal_(0, 0.1)
        x = torch.randn(2, 6 * 6, 8)
        out, _ = dtm(x, (6, 6))
        choice = DTM_PATH_CACHE[("cpu", torch.float32, 8, 16)]
        assert choice in ("fast", "torchvision") and len(DTM_PATH_CACHE) == 1
        dtm.path = choice
        assert torch.equal(dtm(x, (6, 6))[0], out)
        dtm.path = "torchvision" if choice == "fast" else "fast"
        assert_close(dtm(x, (6, 6))[0], out)
        dtm.path = "auto"
        dtm.bfloat16()(x.bfloat16(), (6, 6))
    assert DTM_PATH_CACHE[("cpu", torch.bfloat16, 8, 16)] == "fast"
    DTM_PATH_CACHE.clear()
