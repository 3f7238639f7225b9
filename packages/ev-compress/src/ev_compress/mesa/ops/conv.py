"""Convolution family: ``F.conv1d/2d/3d`` save their 8-bit input; backward by
``aten.convolution_backward`` on the dequantised input."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

from ev_compress.mesa.ops._common import (
    PASS,
    OpKind,
    Quantizer,
    any_requires_grad,
    bind,
    cast,
    is_float_tensor,
    load,
    no_autocast,
    save,
)
from ev_compress.mesa.quant import dequantize

__all__ = ["KINDS"]


def _expand(value: Any, n: int) -> list[int]:
    if isinstance(value, int):
        return [value] * n
    out = [int(v) for v in value]
    return out * n if len(out) == 1 else out


class _ConvFn(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: FunctionCtx,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        func: Callable[..., Tensor],
        quant: Quantizer,
        call: tuple[Any, Any, Any, int],
        geometry: tuple[list[int], list[int], list[int], int],
    ) -> Tensor:
        stride, padding, dilation, groups = call
        out = func(x, weight, bias, stride, padding, dilation, groups)
        qx = quant(x, "input", "channels") if weight.requires_grad else None
        save(ctx, qx, weight)
        c: Any = ctx
        b_dtype = bias.dtype if bias is not None else None
        c.meta = (out.dtype, x.dtype, x.shape, b_dtype, x.device.type)
        c.geometry = geometry
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        qx, weight = load(ctx)
        cd, x_dtype, x_shape, b_dtype, dev = ctx.meta
        stride, padding, dilation, groups = ctx.geometry
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]]
        with no_autocast(dev):
            g = grad.to(cd)
            x_hat = dequantize(qx, cd) if qx is not None else g.new_empty(1).expand(x_shape)
            w = weight.to(cd)
            gx, gw, gb = torch.ops.aten.convolution_backward(
                g,
                x_hat,
                w,
                [w.shape[0]] if b_dtype is not None else None,
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
            None,
            None,
            None,
            None,
        )


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
    call = (b["stride"], padding_arg, b["dilation"], b["groups"])
    geometry = (stride, padding, dilation, int(b["groups"]))
    return _ConvFn.apply(b["input"], weight, b["bias"], func, quant, call, geometry)


KINDS = (
    OpKind(
        "conv",
        "input (F.conv1d/2d/3d, nn.Conv*d)",
        {F.conv1d: handle_conv, F.conv2d: handle_conv, F.conv3d: handle_conv},
    ),
)
