"""Convolution family: ``F.conv1d/2d/3d`` (``ev_mesa::conv``) save their 8-bit input; backward by
``aten.convolution_backward`` on the dequantised input."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ev_compress.mesa.ops._common import (
    PASS,
    OpKind,
    Quantizer,
    any_requires_grad,
    bind,
    cast,
    is_float_tensor,
    parts,
)
from ev_compress.mesa.ops._library import NAMESPACE, autocast_dtype, dq, kernel, to_dtype

__all__ = ["KINDS"]


def _expand(value: Any, n: int) -> list[int]:
    if isinstance(value, int):
        return [value] * n
    out = [int(v) for v in value]
    return out * n if len(out) == 1 else out


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


@torch.library.custom_op(f"{NAMESPACE}::conv", mutates_args=())
def conv_op(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    codes: Tensor | None,
    step: Tensor | None,
    minimum: Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    dtype: torch.dtype | None,
) -> Tensor:
    """``F.conv{1,2,3}d`` (explicit padding) with the weight and bias cast to ``dtype``
    (autocast's cast; ``None``: as they are); backward reads the input from its codes (given
    when the weight needs a gradient)."""
    w, b = to_dtype(weight, dtype), to_dtype(bias, dtype)
    with kernel(x.device.type):
        return _CONV[weight.dim() - 2](x, w, b, stride, padding, dilation, groups)


@conv_op.register_fake
def _(x, weight, bias, codes, step, minimum, stride, padding, dilation, groups, dtype):  # type: ignore[no-untyped-def]
    w, b = to_dtype(weight, dtype), to_dtype(bias, dtype)
    with kernel(x.device.type):
        return _CONV[weight.dim() - 2](x, w, b, stride, padding, dilation, groups)


def _conv_setup(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    x, weight, bias, codes, step, minimum, stride, padding, dilation, groups, _ = inputs
    ctx.save_for_backward(codes, step, minimum, weight)
    ctx.meta = (x.shape, x.dtype, bias.dtype if bias is not None else None)
    ctx.geometry = (list(stride), list(padding), list(dilation), groups)


def _conv_backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
    codes, step, minimum, weight = ctx.saved_tensors
    x_shape, x_dtype, b_dtype = ctx.meta
    stride, padding, dilation, groups = ctx.geometry
    mask = [bool(n) for n in ctx.needs_input_grad[:3]]
    g = grad.to(x_dtype)
    if codes is not None:
        x_hat = dq(codes, step, minimum, x_shape, x_dtype)
    else:  # only the input gradient: the kernel reads the input's shape alone
        x_hat = g.new_zeros(()).expand(x_shape)
    gx, gw, gb = torch.ops.aten.convolution_backward(
        g,
        x_hat,
        weight.to(x_dtype),
        [weight.shape[0]] if b_dtype is not None else None,
        stride,
        padding,
        dilation,
        False,
        [0] * len(stride),
        groups,
        mask,
    )
    return (
        cast(gx, x_dtype) if mask[0] else None,
        cast(gw, weight.dtype) if mask[1] else None,
        cast(gb, b_dtype) if mask[2] else None,
        *([None] * 8),
    )


conv_op.register_autograd(_conv_backward, setup_context=_conv_setup)


def handle_conv(
    func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], quant: Quantizer
) -> Any:
    """``F.conv1d/conv2d/conv3d(input, weight, bias, stride, padding, dilation, groups)``."""
    b = bind(
        ("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
        {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1},
        args,
        kwargs,
    )
    if (
        b is None
        or not is_float_tensor(b["input"])
        or not isinstance(b["weight"], Tensor)
        or not any_requires_grad(b["input"], b["weight"], b["bias"])
    ):
        return PASS
    weight: Tensor = b["weight"]
    nd = weight.dim() - 2
    stride, dilation = _expand(b["stride"], nd), _expand(b["dilation"], nd)
    padding_arg = b["padding"]
    if isinstance(padding_arg, str):
        if padding_arg == "valid":
            padding = [0] * nd
        else:  # "same": symmetric only (odd totals pad asymmetrically inside the op)
            totals = [d * (k - 1) for d, k in zip(dilation, weight.shape[2:], strict=True)]
            if any(t % 2 for t in totals):
                return PASS
            padding = [t // 2 for t in totals]
    else:
        padding = _expand(padding_arg, nd)
    dtype = autocast_dtype("conv", weight.device.type)
    x = to_dtype(b["input"], dtype)
    qx = quant(x, "input", "channels") if weight.requires_grad else None
    return torch.ops.ev_mesa.conv(
        x, weight, b["bias"], *parts(qx), stride, padding, dilation, int(b["groups"]), dtype
    )


KINDS = (
    OpKind(
        "conv",
        "input (F.conv1d/2d/3d, nn.Conv*d)",
        {F.conv1d: handle_conv, F.conv2d: handle_conv, F.conv3d: handle_conv},
    ),
)
