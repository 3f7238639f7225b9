"""Dropout keeps a 1-bit mask. On the CPU ``F.dropout`` multiplies by a noise tensor of the
input's dtype (4 bytes per value in fp32) and autograd keeps it; on CUDA it keeps a bool mask
(1 byte). Mesa draws the same random numbers in the same order (the output is bit-identical),
packs the mask into bits and rebuilds the gradient exactly."""

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
    save,
)
from ev_compress.mesa.quant import pack_bits, unpack_bits

__all__ = ["KINDS"]


class _DropoutFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: FunctionCtx, x: Tensor, p: float) -> Tensor:
        c: Any = ctx
        if x.device.type == "cuda":  # what F.dropout runs on CUDA: the fused kernel
            out, mask = torch.native_dropout(x, p, True)
            c.scale = None
        else:  # what F.dropout runs elsewhere (ATen's _dropout_impl), step by step
            noise = torch.empty_like(x).bernoulli_(1.0 - p)
            noise.div_(1.0 - p)
            out = x * noise
            mask = noise != 0
            c.scale = torch.ones((), dtype=x.dtype, device=x.device).div_(1.0 - p)
        save(ctx, pack_bits(mask))
        c.meta = (x.shape, p)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        (packed,) = load(ctx)
        shape, p = ctx.meta
        keep = unpack_bits(packed, shape)
        if ctx.scale is None:
            return torch.ops.aten.native_dropout_backward(grad, keep, 1.0 / (1.0 - p)), None
        return grad * (keep.to(grad.dtype) * ctx.scale), None


def handle_dropout(
    func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], quant: Quantizer
) -> Any:
    """``F.dropout(input, p=0.5, training=True, inplace=False)``."""
    b = bind(
        ("input", "p", "training", "inplace"),
        {"p": 0.5, "training": True, "inplace": False},
        args,
        kwargs,
    )
    if (
        b is None
        or not is_float_tensor(b["input"])
        or not b["input"].requires_grad
        or b["inplace"]
        or not b["training"]
        or not 0.0 < float(b["p"]) < 1.0
        or b["input"].numel() == 0
    ):
        return PASS
    return _DropoutFn.apply(b["input"], float(b["p"]))


KINDS = (OpKind("dropout", "1-bit mask (F.dropout, nn.Dropout)", {F.dropout: handle_dropout}),)
