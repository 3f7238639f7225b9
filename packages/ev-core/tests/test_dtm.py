"""Deformable token merging: fast path vs the torchvision reference, conv equivalence, bf16."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import deform_conv2d

from ev_core.layers.dtm import DeformableTokenMerging, deform_merge_2x2
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


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("hw", [(8, 8), (7, 9), (5, 6)])
def test_fast_matches_torchvision_forward_backward(dtype: torch.dtype, hw: tuple[int, int]) -> None:
    inputs = [t.requires_grad_() for t in _inputs(*hw, dtype)]
    ref = deform_conv2d(inputs[0], inputs[1], inputs[2], inputs[3], stride=2)
    out = deform_merge_2x2(*inputs)
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
