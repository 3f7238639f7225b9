"""Activation family: GELU and SiLU (8-bit input, ``ev_mesa::gelu/silu``), ReLU (1-bit mask,
``ev_mesa::relu``; in-place calls are the op plus a copy into the input), other
point-wise activations and element-wise products (saved-tensor hooks: LayerScale
``x * gamma``, hand-written activations such as ``x * torch.sigmoid(1.702 * x)``,
hardswish, tanh, ...)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ev_compress.mesa.ops._common import PASS, OpKind, Quantizer, bind, is_float_tensor, parts
from ev_compress.mesa.ops._library import (
    NAMESPACE,
    Derivation,
    autocast_cast,
    dq,
    dq_gelu_backward,
    kernel,
)
from ev_compress.mesa.quant import pack_bits, unpack_bits

__all__ = ["KINDS"]


@torch.library.custom_op(f"{NAMESPACE}::gelu", mutates_args=())
def gelu_op(x: Tensor, codes: Tensor, step: Tensor, minimum: Tensor, approximate: str) -> Tensor:
    """``F.gelu(x, approximate=approximate)``; backward reads ``x`` from its codes."""
    with kernel(x.device.type):
        return F.gelu(x, approximate=approximate)


@gelu_op.register_fake
def _(x, codes, step, minimum, approximate):  # type: ignore[no-untyped-def]
    with kernel(x.device.type):
        return F.gelu(x, approximate=approximate)


def _save_input(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    x, codes, step, minimum, *options = inputs
    ctx.save_for_backward(codes, step, minimum)
    ctx.x_meta = (x.shape, x.dtype)
    ctx.options = options


def _gelu_backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
    codes, step, minimum = ctx.saved_tensors
    _, dtype = ctx.x_meta
    gx = dq_gelu_backward(grad.to(dtype), codes, step, minimum, ctx.options[0])
    return gx, None, None, None, None


gelu_op.register_autograd(_gelu_backward, setup_context=_save_input)


def handle_gelu(
    func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], quant: Quantizer
) -> Any:
    """``F.gelu(input, approximate='none')``."""
    b = bind(("input", "approximate"), {"approximate": "none"}, args, kwargs)
    if b is None or not is_float_tensor(b["input"]) or not b["input"].requires_grad:
        return PASS
    (x,) = autocast_cast("gelu", b["input"])
    qx = quant(x, "input", "channels")
    approximate = str(b["approximate"])
    out = torch.ops.ev_mesa.gelu(x, *parts(qx), approximate)
    quant.derive(out, Derivation(qx, f"gelu:{approximate}"))
    return out


@torch.library.custom_op(f"{NAMESPACE}::silu", mutates_args=())
def silu_op(x: Tensor, codes: Tensor, step: Tensor, minimum: Tensor) -> Tensor:
    """``F.silu(x)``; backward reads ``x`` from its codes."""
    with kernel(x.device.type):
        return F.silu(x)


@silu_op.register_fake
def _(x, codes, step, minimum):  # type: ignore[no-untyped-def]
    with kernel(x.device.type):
        return F.silu(x)


def _silu_backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
    codes, step, minimum = ctx.saved_tensors
    shape, dtype = ctx.x_meta
    gx = torch.ops.aten.silu_backward(grad.to(dtype), dq(codes, step, minimum, shape, dtype))
    return gx, None, None, None


silu_op.register_autograd(_silu_backward, setup_context=_save_input)


def _maybe_inplace(x: Tensor, out: Tensor, inplace: bool) -> Tensor:
    """An in-place activation as the functional op plus a copy into ``x`` (autograd records
    the copy; the op itself saved only its codes or mask)."""
    if not inplace:
        return out
    return x.copy_(out)


def handle_silu(
    func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], quant: Quantizer
) -> Any:
    """``F.silu(input, inplace=False)``."""
    b = bind(("input", "inplace"), {"inplace": False}, args, kwargs)
    if b is None or not is_float_tensor(b["input"]) or not b["input"].requires_grad:
        return PASS
    (x,) = autocast_cast("silu", b["input"])
    qx = quant(x, "input", "channels")
    out = torch.ops.ev_mesa.silu(x, *parts(qx))
    if not b["inplace"]:
        quant.derive(out, Derivation(qx, "silu"))
    return _maybe_inplace(b["input"], out, bool(b["inplace"]))


# ---------------------------------------------------------------------------------------------
# ReLU (1-bit mask)


@torch.library.custom_op(f"{NAMESPACE}::relu", mutates_args=())
def relu_op(x: Tensor) -> tuple[Tensor, Tensor]:
    """``(relu(x), mask)``: the bit-packed mask ``relu(x) > 0`` is all backward keeps."""
    with kernel(x.device.type):
        out = torch.relu(x)
    return out, pack_bits(out > 0)


@relu_op.register_fake
def _(x):  # type: ignore[no-untyped-def]
    with kernel(x.device.type):
        out = torch.relu(x)
    return out, x.new_empty((x.numel() + 7) // 8, dtype=torch.uint8)


def _relu_setup(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor]) -> None:
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(output[1])
    ctx.shape = inputs[0].shape


def _relu_backward(ctx: Any, grad: Tensor, _mask_grad: Any) -> Tensor:
    (packed,) = ctx.saved_tensors
    return grad.masked_fill(~unpack_bits(packed, ctx.shape), 0)


relu_op.register_autograd(_relu_backward, setup_context=_relu_setup)


def handle_relu(
    func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], quant: Quantizer
) -> Any:
    """``F.relu(input, inplace=False)``, ``torch.relu(input)``, ``Tensor.relu()``."""
    b = bind(("input", "inplace"), {"inplace": False}, args, kwargs)
    if b is None or not is_float_tensor(b["input"]) or not b["input"].requires_grad:
        return PASS
    (x,) = autocast_cast("relu", b["input"])
    out, _ = torch.ops.ev_mesa.relu(x)
    return _maybe_inplace(b["input"], out, bool(b["inplace"]))


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
