"""Pooling family. Average pools are linear: autograd keeps the whole input of ``F.avg_pool*d`` only
for its shape; Mesa (``ev_mesa::avg_pool``) keeps nothing and gets the gradient from the same pool
applied to zeros. Max pools are compressed by the saved-tensor hooks (the 8-bit input; the int64
indices stay)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ev_compress.mesa.ops._common import PASS, OpKind, Quantizer, bind, is_float_tensor
from ev_compress.mesa.ops._library import NAMESPACE, autocast_cast, kernel

__all__ = ["KINDS"]

_POOLS = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


def _pool(
    x: Tensor,
    dims: int,
    kernel_size: list[int],
    stride: list[int],
    padding: list[int],
    ceil_mode: bool,
    count_include_pad: bool,
    divisor_override: int | None,
) -> Tensor:
    extra = () if dims == 1 else (divisor_override,)
    return _POOLS[dims](x, kernel_size, stride, padding, ceil_mode, count_include_pad, *extra)


@torch.library.custom_op(f"{NAMESPACE}::avg_pool", mutates_args=())
def avg_pool_op(
    x: Tensor,
    dims: int,
    kernel_size: list[int],
    stride: list[int],
    padding: list[int],
    ceil_mode: bool,
    count_include_pad: bool,
    divisor_override: int | None,
) -> Tensor:
    """``F.avg_pool{dims}d`` (``stride=[]``: the kernel size); backward keeps only the shape."""
    with kernel(x.device.type):
        return _pool(
            x, dims, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override
        )


@avg_pool_op.register_fake
def _(x, *options):  # type: ignore[no-untyped-def]
    with kernel(x.device.type):
        return _pool(x, *options)


def _pool_setup(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    x, *options = inputs
    ctx.meta = (x.shape, x.dtype, x.device, options)


def _pool_backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
    shape, dtype, device, options = ctx.meta
    with torch.enable_grad(), kernel(device.type):
        zero = torch.zeros(shape, dtype=dtype, device=device, requires_grad=True)
        (gx,) = torch.autograd.grad(_pool(zero, *options), zero, grad.to(dtype))
    return (gx, *([None] * 7))


avg_pool_op.register_autograd(_pool_backward, setup_context=_pool_setup)


def _ints(value: Any, n: int) -> list[int]:
    if isinstance(value, int):
        return [value] * n
    out = [int(v) for v in value]
    return out * n if len(out) == 1 else out


def handle_linear_pool(
    func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], quant: Quantizer
) -> Any:
    """``F.avg_pool1d/2d/3d(input, kernel_size, stride, padding, ceil_mode, count_include_pad,
    divisor_override)``."""
    dims = _DIMS[func]
    names: tuple[str, ...] = (
        "input",
        "kernel_size",
        "stride",
        "padding",
        "ceil_mode",
        "count_include_pad",
    )
    defaults: dict[str, Any] = {
        "stride": None,
        "padding": 0,
        "ceil_mode": False,
        "count_include_pad": True,
    }
    if dims > 1:
        names += ("divisor_override",)
        defaults["divisor_override"] = None
    b = bind(names, defaults, args, kwargs)
    if b is None or not is_float_tensor(b["input"]) or not b["input"].requires_grad:
        return PASS
    (x,) = autocast_cast(f"avg_pool{dims}d", b["input"])
    stride = [] if b["stride"] is None else _ints(b["stride"], dims)
    divisor = b.get("divisor_override")
    return torch.ops.ev_mesa.avg_pool(
        x,
        dims,
        _ints(b["kernel_size"], dims),
        stride,
        _ints(b["padding"], dims),
        bool(b["ceil_mode"]),
        bool(b["count_include_pad"]),
        None if divisor is None else int(divisor),
    )


#: (Adaptive average pools already keep nothing.)
_DIMS: dict[Callable[..., Any], int] = {F.avg_pool1d: 1, F.avg_pool2d: 2, F.avg_pool3d: 3}

KINDS = (
    OpKind(
        "avg_pool",
        "nothing (average pools are linear; F.avg_pool1d/2d/3d)",
        dict.fromkeys(_DIMS, handle_linear_pool),
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
