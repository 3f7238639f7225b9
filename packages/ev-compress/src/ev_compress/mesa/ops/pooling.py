"""Pooling family. Average pools are linear: autograd keeps the whole input of ``F.avg_pool*d`` only
for its shape; Mesa keeps nothing and gets the gradient from the same pool applied to zeros. Max pools
are compressed by the saved-tensor hooks (the 8-bit input; the int64 indices stay)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

from ev_compress.mesa.ops._common import PASS, OpKind, Quantizer, is_float_tensor, no_autocast

__all__ = ["KINDS"]


class _LinearPoolFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: FunctionCtx, x: Tensor, call: Callable[[Tensor], Tensor]) -> Tensor:
        c: Any = ctx
        c.meta = (x.shape, x.dtype, x.device, call)
        return call(x)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        shape, dtype, device, call = ctx.meta
        with torch.enable_grad(), no_autocast(device.type):
            zero = torch.zeros(shape, dtype=dtype, device=device, requires_grad=True)
            (gx,) = torch.autograd.grad(call(zero), zero, grad.to(dtype))
        return gx, None


def handle_linear_pool(
    func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], quant: Quantizer
) -> Any:
    """``F.avg_pool1d/2d/3d`` (any arguments)."""
    if not args or not is_float_tensor(args[0]) or not args[0].requires_grad:
        return PASS
    rest = args[1:]
    return _LinearPoolFn.apply(args[0], lambda t: func(t, *rest, **kwargs))


#: (Adaptive average pools already keep nothing.)
_LINEAR_POOLS = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)

KINDS = (
    OpKind(
        "avg_pool",
        "nothing (average pools are linear; F.avg_pool1d/2d/3d)",
        dict.fromkeys(_LINEAR_POOLS, handle_linear_pool),
    ),
    OpKind(
        "max_pool",
        "input (F.max_pool*d, F.adaptive_max_pool*d; saved-tensor hooks; int64 indices stay)",
        hooked=(
            F.max_pool1d,
            F.max_pool2d,
            F.max_pool3d,
            F.adaptive_max_pool1d,
            F.adaptive_max_pool2d,
            F.adaptive_max_pool3d,
        ),
    ),
)
