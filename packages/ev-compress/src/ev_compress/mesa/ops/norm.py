"""Normalisation family.

* Layer norm saves its input *normalised per token*, ``(x − mean)·rstd``, in 8 bits, plus the
  fp32 ``rstd`` (one value per token). Normalising first removes the per-token scale from
  the quantisation range: a token whose values are small (a class token, a padded position)
  would otherwise get few codes, and layer norm's backward multiplies its error by that
  token's large ``rstd``. Backward runs ``aten.native_layer_norm_backward`` on the
  normalised values with mean 0 and rstd 1, then scales the input gradient by ``rstd``.
* Batch norm saves its 8-bit input (one group per channel group along dimension 1) and the
  fp32 mean/invstd.
* ``F.rms_norm`` is compressed by the saved-tensor hooks (its input; the per-row statistic
  stays full precision).
"""

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


class _LayerNormFn(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: FunctionCtx,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        normalized_shape: tuple[int, ...],
        eps: float,
        func: Callable[..., Tensor],
        quant: Quantizer,
    ) -> Tensor:
        dims = tuple(range(-len(normalized_shape), 0))
        sdt = torch.promote_types(x.dtype, torch.float32)
        if torch.is_autocast_enabled(x.device.type):
            out = func(x, normalized_shape, weight, bias, eps)
            var, mean = torch.var_mean(x.to(sdt), dim=dims, correction=0, keepdim=True)
            rstd = (var + eps).rsqrt()
        else:  # same kernel as F.layer_norm, plus the statistics it computes anyway
            out, mean, rstd = torch.native_layer_norm(x, normalized_shape, weight, bias, eps)
            mean, rstd = mean.to(sdt), rstd.to(sdt)
        xn = (x.to(sdt) - mean).mul_(rstd)
        qn = quant(xn, "input", "channels")
        del xn
        save(ctx, qn, rstd, weight, bias)
        c: Any = ctx
        c.meta = (x.dtype, normalized_shape, x.device.type)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        qn, rstd, weight, bias = load(ctx)
        x_dtype, normalized_shape, dev = ctx.meta
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]]
        sdt = rstd.dtype
        with no_autocast(dev):
            gx, gw, gb = torch.ops.aten.native_layer_norm_backward(
                grad.to(sdt),
                dequantize(qn, sdt),
                list(normalized_shape),
                torch.zeros_like(rstd),
                torch.ones_like(rstd),
                cast(weight, sdt),
                cast(bias, sdt),
                mask,
            )
            if gx is not None:
                gx = gx.mul_(rstd)
        return (
            cast(gx, x_dtype) if mask[0] else None,
            cast(gw, weight.dtype if weight is not None else None) if mask[1] else None,
            cast(gb, bias.dtype if bias is not None else None) if mask[2] else None,
            None,
            None,
            None,
            None,
        )


def handle_layer_norm(
    func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], quant: Quantizer
) -> Any:
    """``F.layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5)``."""
    b = bind(
        ("input", "normalized_shape", "weight", "bias", "eps"),
        {"weight": None, "bias": None, "eps": 1e-5},
        args,
        kwargs,
    )
    if (
        b is None
        or not is_float_tensor(b["input"])
        or not any_requires_grad(b["input"], b["weight"], b["bias"])
    ):
        return PASS
    shape = b["normalized_shape"]
    shape = (int(shape),) if isinstance(shape, int) else tuple(int(s) for s in shape)
    return _LayerNormFn.apply(
        b["input"], b["weight"], b["bias"], shape, float(b["eps"]), func, quant
    )


class _BatchNormFn(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: FunctionCtx,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        running_mean: Tensor | None,
        running_var: Tensor | None,
        training: bool,
        momentum: float,
        eps: float,
        func: Callable[..., Tensor],
        quant: Quantizer,
    ) -> Tensor:
        dims = [d for d in range(x.dim()) if d != 1]
        if training or running_mean is None or running_var is None:
            var, mean = torch.var_mean(x.float(), dim=dims, correction=0)
            batch_stats = True
        else:
            mean, var = running_mean.float().clone(), running_var.float().clone()
            batch_stats = False
        invstd = (var + eps).rsqrt()
        out = func(x, running_mean, running_var, weight, bias, training, momentum, eps)
        qx = quant(x, "input", "dim1")
        save(ctx, qx, mean, invstd, weight)
        c: Any = ctx
        c.meta = (x.dtype, batch_stats, bias.dtype if bias is not None else None, x.device.type)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        qx, mean, invstd, weight = load(ctx)
        x_dtype, batch_stats, b_dtype, dev = ctx.meta
        with no_autocast(dev):
            g = grad.float()
            x_hat = dequantize(qx, torch.float32)
            view = [1, -1] + [1] * (g.dim() - 2)
            dims = [d for d in range(g.dim()) if d != 1]
            xn = (x_hat - mean.view(view)) * invstd.view(view)
            gb = g.sum(dims)
            gw = (g * xn).sum(dims)
            gx = None
            if ctx.needs_input_grad[0]:
                scale = invstd if weight is None else weight.float() * invstd
                if batch_stats:
                    m = g.numel() / g.shape[1]
                    gx = scale.view(view) * (g - gb.view(view) / m - xn * (gw / m).view(view))
                else:
                    gx = g * scale.view(view)
        return (
            cast(gx, x_dtype),
            cast(gw, weight.dtype if weight is not None else None)
            if ctx.needs_input_grad[1]
            else None,
            cast(gb, b_dtype) if ctx.needs_input_grad[2] else None,
            None,
            None,
            None,
            None,
            None,
            None,
            None,
        )


def handle_batch_norm(
    func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], quant: Quantizer
) -> Any:
    """``F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)``."""
    b = bind(
        ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"),
        {"weight": None, "bias": None, "training": False, "momentum": 0.1, "eps": 1e-5},
        args,
        kwargs,
    )
    if (
        b is None
        or not is_float_tensor(b["input"])
        or b["input"].dim() < 2
        or not any_requires_grad(b["input"], b["weight"], b["bias"])
    ):
        return PASS
    return _BatchNormFn.apply(
        b["input"],
        b["weight"],
        b["bias"],
        b["running_mean"],
        b["running_var"],
        bool(b["training"]),
        b["momentum"],
        float(b["eps"]),
        func,
        quant,
    )


KINDS = (
    OpKind(
        "layer_norm",
        "input normalised per token + fp32 rstd (F.layer_norm, nn.LayerNorm and subclasses)",
        {F.layer_norm: handle_layer_norm},
    ),
    OpKind(
        "batch_norm",
        "input + fp32 mean/invstd (F.batch_norm, nn.BatchNorm*d)",
        {F.batch_norm: handle_batch_norm},
    ),
    OpKind(
        "rms_norm",
        "input (F.rms_norm, nn.RMSNorm; saved-tensor hooks; the per-row statistic stays fp)",
        hooked=(F.rms_norm, torch.rms_norm),
    ),
)
