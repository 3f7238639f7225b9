"""Activation family: GELU and SiLU (8-bit input, Mesa functions), ReLU (1-bit mask), other
point-wise activations and element-wise products (saved-tensor hooks: LayerScale
``x * gamma``, hand-written activations such as ``x * torch.sigmoid(1.702 * x)``,
hardswish, tanh, ...)."""

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
    bind,
    is_float_tensor,
    load,
    no_autocast,
    save,
)
from ev_compress.mesa.quant import dequantize, pack_bits, unpack_bits

__all__ = ["KINDS"]


class _GeluFn(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: FunctionCtx, x: Tensor, approximate: str, func: Callable[..., Tensor], quant: Quantizer
    ) -> Tensor:
        out = func(x, approximate=approximate)
        save(ctx, quant(x, "input", "channels"))
        c: Any = ctx
        c.meta = (out.dtype, x.dtype, approximate, x.device.type)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        (qx,) = load(ctx)
        cd, x_dtype, approximate, dev = ctx.meta
        with no_autocast(dev):
            gx = torch.ops.aten.gelu_backward(
                grad.to(cd), dequantize(qx, cd), approximate=approximate
            )
        return gx.to(x_dtype), None, None, None


def handle_gelu(
    func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], quant: Quantizer
) -> Any:
    """``F.gelu(input, approximate='none')``."""
    b = bind(("input", "approximate"), {"approximate": "none"}, args, kwargs)
    if b is None or not is_float_tensor(b["input"]) or not b["input"].requires_grad:
        return PASS
    return _GeluFn.apply(b["input"], b["approximate"], func, quant)


class _SiluFn(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: FunctionCtx, x: Tensor, inplace: bool, func: Callable[..., Tensor], quant: Quantizer
    ) -> Tensor:
        qx = quant(x, "input", "channels")  # before an in-place op overwrites x
        save(ctx, qx)
        c: Any = ctx
        c.meta = (x.dtype, x.device.type)
        if inplace:
            func(x, inplace=True)
            ctx.mark_dirty(x)
            return x
        return func(x)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        (qx,) = load(ctx)
        x_dtype, dev = ctx.meta
        with no_autocast(dev):
            gx = torch.ops.aten.silu_backward(grad.to(x_dtype), dequantize(qx, x_dtype))
        return gx, None, None, None


def handle_silu(
    func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], quant: Quantizer
) -> Any:
    """``F.silu(input, inplace=False)``."""
    b = bind(("input", "inplace"), {"inplace": False}, args, kwargs)
    if b is None or not is_float_tensor(b["input"]) or not b["input"].requires_grad:
        return PASS
    return _SiluFn.apply(b["input"], bool(b["inplace"]), func, quant)


# ---------------------------------------------------------------------------------------------
# ReLU (1-bit mask)


class _ReluFn(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: FunctionCtx, x: Tensor, inplace: bool, call: Callable[[Tensor], Tensor]
    ) -> Tensor:
        out = call(x)
        save(ctx, pack_bits(out > 0))
        c: Any = ctx
        c.shape = out.shape
        if inplace:
            ctx.mark_dirty(x)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        (packed,) = load(ctx)
        keep = unpack_bits(packed, ctx.shape)
        return grad.masked_fill(~keep, 0), None, None


def handle_relu(
    func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], quant: Quantizer
) -> Any:
    """``F.relu(input, inplace=False)``, ``torch.relu(input)``, ``Tensor.relu()``."""
    b = bind(("input", "inplace"), {"inplace": False}, args, kwargs)
    if b is None or not is_float_tensor(b["input"]) or not b["input"].requires_grad:
        return PASS
    inplace = bool(b["inplace"])
    if inplace:
        return _ReluFn.apply(b["input"], True, lambda t: func(t, inplace=True))
    return _ReluFn.apply(b["input"], False, lambda t: func(*args, **kwargs))


KINDS = (
    OpKind("gelu", "input (F.gelu, nn.GELU)", {F.gelu: handle_gelu}),
    OpKind("silu", "input (F.silu, nn.SiLU)", {F.silu: handle_silu}),
    OpKind(
        "relu",
        "1-bit mask (F.relu, torch.relu, Tensor.relu, nn.ReLU)",
        {F.relu: handle_relu, torch.relu: handle_relu, Tensor.relu: handle_relu},
    ),
    OpKind(
        "pointwise",
        "input or output (sigmoid, tanh, hardswish, hardsigmoid, mish, elu, leaky_relu, "
        "softplus, exp; saved-tensor hooks)",
        hooked=(
            torch.sigmoid,
            Tensor.sigmoid,
            F.sigmoid,
            torch.tanh,
            Tensor.tanh,
            F.tanh,
            F.hardswish,
            F.hardsigmoid,
            F.mish,
            F.elu,
            F.leaky_relu,
            F.softplus,
            torch.exp,
            Tensor.exp,
        ),
    ),
    OpKind(
        "mul",
        "both operands of element-wise products (LayerScale x * gamma, x * sigmoid(1.702 x); "
        "saved-tensor hooks)",
        hooked=(torch.mul, Tensor.mul, Tensor.__mul__, Tensor.__rmul__),
    ),
)
