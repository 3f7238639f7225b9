"""Normalisation family.

* Layer norm saves its input *normalised per token*, ``(x − mean)·rstd``, in 8 bits, plus the
  fp32 ``rstd`` (one value per token). Normalising first removes the per-token scale from
  the quantisation range: a token whose values are small (a class token, a padded position)
  would otherwise get few codes, and layer norm's backward multiplies its error by that
  token's large ``rstd``. Backward runs ``aten.native_layer_norm_backward`` on the
  dequantised normalised values divided by ``rstd`` per token (one pass) with mean 0 and the
  saved ``rstd``: the input it sees normalises to those values, and its input gradient needs no
  further scaling.
* Batch norm saves its input *normalised per channel* by the statistics it normalises with (batch
  statistics in training, the running ones otherwise) in 8 bits (channel groups along dimension
  1), plus the fp32 ``invstd``. With few values per channel (a 1×1 map at batch 4) the variance
  is tiny next to the spread of a channel group, and quantising the raw input made backward
  multiply a group-sized rounding error by ``invstd``: the gradient of a bias before the norm,
  zero in exact arithmetic, then grew without bound (LITv2's last token merging at 32×32
  diverged in a few steps). Backward re-centres the dequantised values (they have mean 0
  exactly in training mode).
* ``F.rms_norm`` is compressed by the saved-tensor hooks (its input; the per-row statistic
  stays full precision).
"""

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
)
from ev_compress.mesa.ops._library import (
    NAMESPACE,
    Derivation,
    autocast_cast,
    dq,
    dq_rows,
    fake_internal,
    kernel,
    quantize_internal,
)

__all__ = ["KINDS"]


@torch.library.custom_op(f"{NAMESPACE}::layer_norm", mutates_args=())
def layer_norm_op(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    normalized_shape: list[int],
    eps: float,
    running_range: Tensor,
    running_min: Tensor,
    seed: Tensor,
    salt: int,
    qdim: int,
    groups: int,
    bits: int,
    momentum: float,
    update: bool,
    stochastic: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``F.layer_norm`` and what backward keeps: ``(out, codes, step, minimum, rstd, new_range,
    new_min)``, the codes of the input normalised per token and its fp32 ``rstd``."""
    sdt = torch.promote_types(x.dtype, torch.float32)
    with kernel(x.device.type):  # the kernel F.layer_norm runs, plus its statistics
        out, mean, rstd = torch.native_layer_norm(x, normalized_shape, weight, bias, eps)
    mean, rstd = mean.to(sdt), rstd.to(sdt)
    qargs = (running_range, running_min, seed, salt, qdim, groups, bits, momentum, update)
    codes, step, minimum, new_range, new_min = quantize_internal(
        x, *qargs, stochastic, normalize=(mean, rstd)
    )
    return out, codes, step, minimum, rstd, new_range, new_min


@layer_norm_op.register_fake
def _(x, weight, bias, normalized_shape, eps, *qargs):  # type: ignore[no-untyped-def]
    sdt = torch.promote_types(x.dtype, torch.float32)
    with kernel(x.device.type):
        out, _, rstd = torch.native_layer_norm(x, normalized_shape, weight, bias, eps)
    codes, step, minimum, new_range, new_min = fake_internal(x, *qargs)
    return out, codes, step, minimum, rstd.to(sdt), new_range, new_min


def _layer_norm_setup(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
    x, weight, bias, normalized_shape = inputs[:4]
    ctx.mark_non_differentiable(*output[1:])
    ctx.save_for_backward(*output[1:5], weight, bias)
    ctx.meta = (x.shape, x.dtype, list(normalized_shape))


def _layer_norm_backward(ctx: Any, grad: Tensor, *_: Any) -> tuple[Tensor | None, ...]:
    codes, step, minimum, rstd, weight, bias = ctx.saved_tensors
    shape, x_dtype, normalized_shape = ctx.meta
    mask = [bool(n) for n in ctx.needs_input_grad[:3]]
    sdt = rstd.dtype
    per_row = codes.shape[0] == rstd.numel() and codes.shape[1] * codes.shape[2] == shape[-1]
    if per_row:  # x̂ = (normalised values)/rstd with mean 0: the input gradient is gx
        x_hat, rstd_arg = dq_rows(codes, step, minimum, shape, sdt, rstd.reciprocal()), rstd
    else:  # the normalised values with mean 0 and rstd 1: the input gradient is gx·rstd
        x_hat, rstd_arg = dq(codes, step, minimum, shape, sdt), torch.ones_like(rstd)
    gx, gw, gb = torch.ops.aten.native_layer_norm_backward(
        grad.to(sdt),
        x_hat,
        normalized_shape,
        torch.zeros_like(rstd),
        rstd_arg,
        cast(weight, sdt),
        cast(bias, sdt),
        mask,
    )
    if mask[0] and not per_row:
        gx = gx * rstd
    return (
        gx.to(x_dtype) if mask[0] else None,
        gw.to(weight.dtype) if mask[1] else None,
        gb.to(bias.dtype) if mask[2] else None,
        *([None] * 12),
    )


layer_norm_op.register_autograd(_layer_norm_backward, setup_context=_layer_norm_setup)


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
    shape = [int(shape)] if isinstance(shape, int) else [int(s) for s in shape]
    x, weight, bias = autocast_cast("layer_norm", b["input"], b["weight"], b["bias"])
    qa = quant.args(x, "input", "channels")
    out, codes, step, minimum, _, new_range, new_min = torch.ops.ev_mesa.layer_norm(
        x, weight, bias, shape, float(b["eps"]), *qa.op_args()
    )
    qt = quant.commit(qa, "input", x, codes, step, minimum, new_range, new_min, reuse=False)
    # the affine parameters as they are now (a copy of C values: no parameter storage that
    # FSDP may free or an optimizer may change is kept for the linear layer's backward)
    w, b_ = (None if t is None else t.detach().clone() for t in (weight, bias))
    quant.derive(out, Derivation(qt, "layer_norm", w, b_))
    return out


@torch.library.custom_op(f"{NAMESPACE}::batch_norm", mutates_args=())
def batch_norm_op(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    training: bool,
    bn_momentum: float,
    eps: float,
    running_range: Tensor,
    running_min: Tensor,
    seed: Tensor,
    salt: int,
    qdim: int,
    groups: int,
    bits: int,
    momentum: float,
    update: bool,
    stochastic: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``F.batch_norm`` on copies of the running statistics, and what backward keeps: ``(out,
    codes, step, minimum, invstd, new_running_mean, new_running_var, new_range, new_min)``, the
    codes of the input normalised per channel (by the statistics the op normalises with) and
    the fp32 ``invstd``; the new running statistics are empty without running statistics."""
    dims = [d for d in range(x.dim()) if d != 1]
    if training or running_mean is None or running_var is None:
        var, mean = torch.var_mean(x.float(), dim=dims, correction=0)
    else:
        mean, var = running_mean.float(), running_var.float()
    invstd = (var + eps).rsqrt()
    rm = running_mean.clone() if running_mean is not None else None
    rv = running_var.clone() if running_var is not None else None
    with kernel(x.device.type):
        out = F.batch_norm(x, rm, rv, weight, bias, training, bn_momentum, eps)
    view = [1, -1] + [1] * (x.dim() - 2)
    xn = (x.float() - mean.view(view)).mul_(invstd.view(view))
    qargs = (running_range, running_min, seed, salt, qdim, groups, bits, momentum, update)
    codes, step, minimum, new_range, new_min = quantize_internal(xn, *qargs, stochastic)
    return (
        out,
        codes,
        step,
        minimum,
        invstd,
        x.new_empty(0) if rm is None else rm,
        x.new_empty(0) if rv is None else rv,
        new_range,
        new_min,
    )


@batch_norm_op.register_fake
def _(x, weight, bias, running_mean, running_var, training, bn_momentum, eps, *qargs):  # type: ignore[no-untyped-def]
    with kernel(x.device.type):
        out = F.batch_norm(x, None, None, weight, bias, True, 0.0, eps)
    codes, step, minimum, new_range, new_min = fake_internal(x, *qargs)
    return (
        out,
        codes,
        step,
        minimum,
        x.new_empty(x.shape[1], dtype=torch.float32),
        x.new_empty(0) if running_mean is None else torch.empty_like(running_mean),
        x.new_empty(0) if running_var is None else torch.empty_like(running_var),
        new_range,
        new_min,
    )


def _batch_norm_setup(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
    x, weight, bias, running_mean, running_var, training = inputs[:6]
    ctx.mark_non_differentiable(*output[1:])
    ctx.save_for_backward(*output[1:5], weight)
    batch_stats = bool(training) or running_mean is None or running_var is None
    ctx.meta = (x.shape, x.dtype, batch_stats, bias.dtype if bias is not None else None)


def _batch_norm_backward(ctx: Any, grad: Tensor, *_: Any) -> tuple[Tensor | None, ...]:
    codes, step, minimum, invstd, weight = ctx.saved_tensors
    shape, x_dtype, batch_stats, b_dtype = ctx.meta
    needs = ctx.needs_input_grad
    g = grad.float()
    view = [1, -1] + [1] * (g.dim() - 2)
    dims = [d for d in range(g.dim()) if d != 1]
    xn = dq(codes, step, minimum, shape, torch.float32)
    if batch_stats:  # exactly centred, as the true normalised input (the rounding error's mean)
        xn = xn - xn.mean(dims, keepdim=True)
    gb = g.sum(dims)
    gw = (g * xn).sum(dims)
    gx = None
    if needs[0]:
        scale = invstd if weight is None else weight.float() * invstd
        if batch_stats:
            m = g.numel() / g.shape[1]
            gx = scale.view(view) * (g - gb.view(view) / m - xn * (gw / m).view(view))
        else:
            gx = g * scale.view(view)
    return (
        cast(gx, x_dtype),
        cast(gw, weight.dtype if weight is not None else None) if needs[1] else None,
        cast(gb, b_dtype) if needs[2] else None,
        *([None] * 15),
    )


batch_norm_op.register_autograd(_batch_norm_backward, setup_context=_batch_norm_setup)


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
    x, weight, bias = autocast_cast("batch_norm", b["input"], b["weight"], b["bias"])
    running_mean, running_var = b["running_mean"], b["running_var"]
    training = bool(b["training"])
    momentum = 0.0 if b["momentum"] is None else float(b["momentum"])
    qa = quant.args(x, "input", "dim1")
    out, codes, step, minimum, _, new_mean, new_var, new_range, new_min = (
        torch.ops.ev_mesa.batch_norm(
            x, weight, bias, running_mean, running_var, training, momentum, float(b["eps"]),
            *qa.op_args(),
        )
    )  # fmt: skip
    quant.commit(qa, "input", x, codes, step, minimum, new_range, new_min, reuse=False)
    if training and running_mean is not None and running_var is not None:
        with torch.no_grad():
            running_mean.copy_(new_mean)
            running_var.copy_(new_var)
    return out


KINDS = (
    OpKind(
        "layer_norm",
        "input normalised per token + fp32 rstd (F.layer_norm, nn.LayerNorm and subclasses)",
        {F.layer_norm: handle_layer_norm},
    ),
    OpKind(
        "batch_norm",
        "input normalised per channel + fp32 invstd (F.batch_norm, nn.BatchNorm*d)",
        {F.batch_norm: handle_batch_norm},
    ),
    OpKind(
        "rms_norm",
        "input (F.rms_norm, nn.RMSNorm; saved-tensor hooks; the per-row statistic stays fp)",
        hooked=(F.rms_norm, torch.rms_norm),
    ),
)
