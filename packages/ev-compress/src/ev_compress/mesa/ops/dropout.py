"""Dropout keeps a 1-bit mask. On the CPU ``F.dropout`` multiplies by a noise tensor of the
input's dtype (4 bytes per value in fp32) and autograd keeps it; on CUDA it keeps a bool mask
(1 byte). Mesa draws the same random numbers in the same order (the output is bit-identical),
packs the mask into bits and rebuilds the gradient exactly (``ev_mesa::dropout``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ev_compress.mesa.ops._common import PASS, OpKind, Quantizer, bind, is_float_tensor
from ev_compress.mesa.ops._library import NAMESPACE
from ev_compress.mesa.quant import pack_bits, unpack_bits

__all__ = ["KINDS"]


@torch.library.custom_op(
    f"{NAMESPACE}::dropout", mutates_args=(), tags=(torch.Tag.nondeterministic_seeded,)
)
def dropout_op(x: Tensor, p: float) -> tuple[Tensor, Tensor]:
    """``(F.dropout(x, p), mask)`` drawing from the global generator exactly as ``F.dropout``;
    the mask is bit-packed."""
    if x.device.type == "cuda":  # what F.dropout runs on CUDA: the fused kernel
        out, mask = torch.native_dropout(x, p, True)
    else:  # what F.dropout runs elsewhere (ATen's _dropout_impl), step by step
        noise = torch.empty_like(x).bernoulli_(1.0 - p)
        noise.div_(1.0 - p)
        out = x * noise
        mask = noise != 0
    return out, pack_bits(mask)


@dropout_op.register_fake
def _(x, p):  # type: ignore[no-untyped-def]
    return torch.empty_like(x), x.new_empty((x.numel() + 7) // 8, dtype=torch.uint8)


def _dropout_setup(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor]) -> None:
    x, p = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(output[1])
    ctx.meta = (x.shape, p, x.device.type == "cuda")


def _dropout_backward(ctx: Any, grad: Tensor, _mask_grad: Any) -> tuple[Tensor | None, ...]:
    (packed,) = ctx.saved_tensors
    shape, p, fused = ctx.meta
    keep = unpack_bits(packed, shape)
    if fused:
        return torch.ops.aten.native_dropout_backward(grad, keep, 1.0 / (1.0 - p)), None
    scale = torch.ones((), dtype=grad.dtype, device=grad.device).div_(1.0 - p)
    return grad * (keep.to(grad.dtype) * scale), None


dropout_op.register_autograd(_dropout_backward, setup_context=_dropout_setup)


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
    out, _ = torch.ops.ev_mesa.dropout(b["input"], float(b["p"]))
    return out


KINDS = (OpKind("dropout", "1-bit mask (F.dropout, nn.Dropout)", {F.dropout: handle_dropout}),)
