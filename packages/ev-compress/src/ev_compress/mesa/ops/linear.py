"""Linear family: ``F.linear`` (a Mesa autograd function saving the 8-bit input) and the
``addmm``/``baddbmm``/``mm`` products (their saved operands compressed by the saved-tensor
hooks)."""

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
    is_float_tensor,
    load,
    no_autocast,
    save,
)
from ev_compress.mesa.quant import dequantize

__all__ = ["KINDS"]


class _LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: FunctionCtx,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        func: Callable[..., Tensor],
        quant: Quantizer,
    ) -> Tensor:
        out = func(x, weight, bias)
        qx = quant(x, "input", "channels") if weight.requires_grad else None
        save(ctx, qx, weight)
        c: Any = ctx
        c.meta = (out.dtype, x.dtype, bias.dtype if bias is not None else None, x.device.type)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        qx, weight = load(ctx)
        cd, x_dtype, b_dtype, dev = ctx.meta
        gx = gw = gb = None
        with no_autocast(dev):
            g = grad.to(cd)
            g2 = g.reshape(-1, g.shape[-1])
            if ctx.needs_input_grad[0]:
                gx = (g @ weight.to(cd)).to(x_dtype)
            if ctx.needs_input_grad[1]:
                x_hat = dequantize(qx, cd)
                gw = (g2.t() @ x_hat.reshape(-1, x_hat.shape[-1])).to(weight.dtype)
            if ctx.needs_input_grad[2]:
                gb = g2.sum(0).to(b_dtype)
        return gx, gw, gb, None, None


def handle_linear(
    func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], quant: Quantizer
) -> Any:
    """``F.linear(input, weight, bias=None)``."""
    b = bind(("input", "weight", "bias"), {"bias": None}, args, kwargs)
    if (
        b is None
        or not is_float_tensor(b["input"])
        or not isinstance(b["weight"], Tensor)
        or not _any_grad(b)
    ):
        return PASS
    return _LinearFn.apply(b["input"], b["weight"], b["bias"], func, quant)


def _any_grad(b: dict[str, Any]) -> bool:
    return any_requires_grad(b["input"], b["weight"], b["bias"])


KINDS = (
    OpKind("linear", "input (F.linear, nn.Linear)", {F.linear: handle_linear}),
    OpKind(
        "addmm",
        "operands (torch.addmm/baddbmm/addbmm/mm, Tensor methods; saved-tensor hooks)",
        hooked=(
            torch.addmm,
            Tensor.addmm,
            torch.baddbmm,
            Tensor.baddbmm,
            torch.addbmm,
            Tensor.addbmm,
            torch.mm,
            Tensor.mm,
        ),
    ),
)
