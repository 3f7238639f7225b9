"""Attention family: softmax (8-bit output), same-batch matmuls (both operands, head-wise),
``F.scaled_dot_product_attention`` (q/k/v; backward recomputes attention), and, through the
saved-tensor hooks, broadcasting matmuls (``x @ W``) and two-operand ``torch.einsum``."""

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


class _SoftmaxFn(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: FunctionCtx, x: Tensor, dim: int, call: Callable[[Tensor], Tensor], quant: Quantizer
    ) -> Tensor:
        out = call(x)
        save(ctx, quant(out, "output", "heads"))
        c: Any = ctx
        c.meta = (out.dtype, x.dtype, dim % max(out.dim(), 1), x.device.type)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        (qy,) = load(ctx)
        out_dtype, x_dtype, dim, dev = ctx.meta
        with no_autocast(dev):
            gx = torch.ops.aten._softmax_backward_data(
                grad.to(out_dtype), dequantize(qy, out_dtype), dim, x_dtype
            )
        return gx, None, None, None


def handle_softmax(
    func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], quant: Quantizer
) -> Any:
    """``F.softmax(input, dim, _stacklevel, dtype)``, ``torch.softmax``, ``Tensor.softmax``."""
    b = bind(
        ("input", "dim", "_stacklevel", "dtype"), {"_stacklevel": 3, "dtype": None}, args, kwargs
    )
    if (
        b is None
        or not isinstance(b["dim"], int)
        or not is_float_tensor(b["input"])
        or not b["input"].requires_grad
    ):
        return PASS
    return _SoftmaxFn.apply(b["input"], b["dim"], lambda t: func(*args, **kwargs), quant)


# ---------------------------------------------------------------------------------------------
# matmul


class _MatmulFn(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: FunctionCtx, a: Tensor, b: Tensor, func: Callable[..., Tensor], quant: Quantizer
    ) -> Tensor:
        out = func(a, b)
        qa = quant(a, "a", "heads") if b.requires_grad else None
        qb = quant(b, "b", "heads") if a.requires_grad else None
        save(ctx, qa, qb)
        c: Any = ctx
        c.meta = (out.dtype, a.dtype, b.dtype, a.device.type)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        qa, qb = load(ctx)
        cd, a_dtype, b_dtype, dev = ctx.meta
        ga = gb = None
        with no_autocast(dev):
            g = grad.to(cd)
            if ctx.needs_input_grad[0]:
                ga = (g @ dequantize(qb, cd).transpose(-2, -1)).to(a_dtype)
            if ctx.needs_input_grad[1]:
                gb = (dequantize(qa, cd).transpose(-2, -1) @ g).to(b_dtype)
        return ga, gb, None, None


def handle_matmul(
    func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], quant: Quantizer
) -> Any:
    """``torch.matmul``/``Tensor.matmul``/``@``/``torch.bmm`` of same-rank, same-batch operands.

    Broadcasting matmuls and vector products run unchanged.
    """
    if len(args) != 2 or kwargs:
        return PASS
    a, b = args
    if (
        not is_float_tensor(a)
        or not is_float_tensor(b)
        or a.dim() < 2
        or a.dim() != b.dim()
        or a.shape[:-2] != b.shape[:-2]
        or not any_requires_grad(a, b)
    ):
        return PASS
    return _MatmulFn.apply(a, b, func, quant)


# ---------------------------------------------------------------------------------------------
# scaled dot-product attention


class _SdpaFn(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: FunctionCtx,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        mask: Tensor | None,
        options: dict[str, Any],
        func: Callable[..., Tensor],
        quant: Quantizer,
    ) -> Tensor:
        rng: Tensor | None = None
        if options["dropout_p"] > 0.0:  # the backward recomputation replays the dropout mask
            rng = (
                torch.cuda.get_rng_state(q.device)
                if q.device.type == "cuda"
                else torch.get_rng_state()
            )
        out = func(q, k, v, attn_mask=mask, **options)
        save(
            ctx,
            quant(q, "q", "heads"),
            quant(k, "k", "heads"),
            quant(v, "v", "heads"),
            mask,
        )
        c: Any = ctx
        c.meta = (out.dtype, (q.dtype, k.dtype, v.dtype), q.device, options, func, rng)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        qq, qk, qv, mask = load(ctx)
        cd, dtypes, device, options, func, rng = ctx.meta
        needs = ctx.needs_input_grad[:4]
        leaves = [dequantize(t, cd).requires_grad_(n) for t, n in zip((qq, qk, qv), needs[:3])]
        mask_leaf = None
        if mask is not None:
            mask_leaf = mask.detach().requires_grad_(bool(needs[3]))
        devices = [device.index if device.index is not None else 0] if device.type == "cuda" else []
        with (
            torch.enable_grad(),
            no_autocast(device.type),
            torch.random.fork_rng(devices=devices, enabled=rng is not None),
        ):
            if rng is not None:
                if device.type == "cuda":
                    torch.cuda.set_rng_state(rng, device)
                else:
                    torch.set_rng_state(rng)
            m = mask_leaf
            if m is not None and m.is_floating_point():
                m = m.to(cd)
            out = func(*leaves, attn_mask=m, **options)
            inputs = [t for t, n in zip([*leaves, mask_leaf], needs) if n and t is not None]
            grads = iter(torch.autograd.grad(out, inputs, grad.to(cd)))
        result: list[Tensor | None] = []
        for i, (t, n) in enumerate(zip([*leaves, mask_leaf], needs)):
            if not n or t is None:
                result.append(None)
                continue
            gr = next(grads)
            result.append(gr.to(dtypes[i]) if i < 3 else gr)
        return (*result, None, None, None)


def handle_sdpa(
    func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], quant: Quantizer
) -> Any:
    """``F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal, scale, ...)``."""
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
    defaults = {
        "attn_mask": None,
        "dropout_p": 0.0,
        "is_causal": False,
        "scale": None,
        "enable_gqa": False,
    }
    b = bind(names, defaults, args, kwargs)
    if (
        b is None
        or not all(is_float_tensor(b[n]) for n in names[:3])
        or not any_requires_grad(b["query"], b["key"], b["value"], b["attn_mask"])
    ):
        return PASS
    options: dict[str, Any] = {
        "dropout_p": float(b["dropout_p"]),
        "is_causal": bool(b["is_causal"]),
        "scale": b["scale"],
    }
    if b["enable_gqa"]:
        options["enable_gqa"] = True
    return _SdpaFn.apply(b["query"], b["key"], b["value"], b["attn_mask"], options, func, quant)


KINDS = (
    OpKind(
        "softmax",
        "output (F.softmax, torch.softmax, Tensor.softmax, nn.Softmax)",
        {F.softmax: handle_softmax, torch.softmax: handle_softmax, Tensor.softmax: handle_softmax},
    ),
    OpKind(
        "matmul",
        "both operands (torch.matmul, @, torch.bmm; broadcasting x @ W through the "
        "saved-tensor hooks)",
        {
            torch.matmul: handle_matmul,
            Tensor.matmul: handle_matmul,
            Tensor.__matmul__: handle_matmul,
            torch.bmm: handle_matmul,
            Tensor.bmm: handle_matmul,
        },
    ),
    OpKind("einsum", "operands (torch.einsum; saved-tensor hooks)", hooked=(torch.einsum,)),
    OpKind(
        "sdpa",
        "q, k, v; backward recomputes attention (F.scaled_dot_product_attention)",
        {F.scaled_dot_product_attention: handle_sdpa},
    ),
)
