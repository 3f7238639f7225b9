"""Attention family: softmax (8-bit output), same-batch matmuls (both operands, head-wise),
``F.scaled_dot_product_attention`` (q/k/v; backward recomputes attention), and, through the
saved-tensor hooks, broadcasting matmuls (``x @ W``) and two-operand ``torch.einsum``."""

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
    is_float_tensor,
    parts,
)
from ev_compress.mesa.ops._library import (
    NAMESPACE,
    autocast_cast,
    dq,
    fake_internal,
    kernel,
    quantize_internal,
)

__all__ = ["KINDS"]


@torch.library.custom_op(f"{NAMESPACE}::softmax", mutates_args=())
def softmax_op(
    x: Tensor,
    dim: int,
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
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``softmax(x, dim)`` and the codes of that output (what backward needs):
    ``(out, codes, step, minimum, new_range, new_min)``."""
    with kernel(x.device.type):
        out = torch.softmax(x, dim)
    qargs = (running_range, running_min, seed, salt, qdim, groups, bits, momentum, update)
    return (out, *quantize_internal(out, *qargs, stochastic))


@softmax_op.register_fake
def _(x, dim, *qargs):  # type: ignore[no-untyped-def]
    with kernel(x.device.type):
        out = torch.softmax(x, dim)
    return (out, *fake_internal(out, *qargs))


def _softmax_setup(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
    ctx.mark_non_differentiable(*output[1:])
    ctx.save_for_backward(*output[1:4])
    out = output[0]
    ctx.meta = (out.shape, out.dtype, inputs[1] % max(out.dim(), 1))


def _softmax_backward(ctx: Any, grad: Tensor, *_: Any) -> tuple[Tensor | None, ...]:
    codes, step, minimum = ctx.saved_tensors
    shape, dtype, dim = ctx.meta
    y = dq(codes, step, minimum, shape, dtype)
    gx = torch.ops.aten._softmax_backward_data(grad.to(dtype), y, dim, dtype)
    return (gx, *([None] * 11))


softmax_op.register_autograd(_softmax_backward, setup_context=_softmax_setup)


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
    x = b["input"] if b["dtype"] is None else b["input"].to(b["dtype"])
    (x,) = autocast_cast("softmax", x)
    qa = quant.args(x, "output", "heads")
    out, *q = torch.ops.ev_mesa.softmax(x, b["dim"], *qa.op_args())
    quant.commit(qa, "output", out, *q, reuse=True)
    return out


# ---------------------------------------------------------------------------------------------
# matmul


@torch.library.custom_op(f"{NAMESPACE}::matmul", mutates_args=())
def matmul_op(
    a: Tensor,
    b: Tensor,
    a_codes: Tensor | None,
    a_step: Tensor | None,
    a_min: Tensor | None,
    b_codes: Tensor | None,
    b_step: Tensor | None,
    b_min: Tensor | None,
) -> Tensor:
    """``a @ b`` (same batch shape); backward reads each operand from its codes (given when
    the other operand needs a gradient)."""
    with kernel(a.device.type):
        return torch.matmul(a, b)


@matmul_op.register_fake
def _(a, b, *codes):  # type: ignore[no-untyped-def]
    return torch.matmul(a, b)


def _matmul_setup(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    a, b, *codes = inputs
    ctx.save_for_backward(*codes)
    ctx.meta = (a.shape, a.dtype, b.shape, b.dtype)


def _matmul_backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
    ac, as_, am, bc, bs, bm = ctx.saved_tensors
    a_shape, a_dtype, b_shape, b_dtype = ctx.meta
    needs = ctx.needs_input_grad
    ga = gb = None
    if needs[0]:
        b_hat = dq(bc, bs, bm, b_shape, b_dtype)
        ga = (grad.to(b_dtype) @ b_hat.transpose(-2, -1)).to(a_dtype)
    if needs[1]:
        a_hat = dq(ac, as_, am, a_shape, a_dtype)
        gb = (a_hat.transpose(-2, -1) @ grad.to(a_dtype)).to(b_dtype)
    return (ga, gb, *([None] * 6))


matmul_op.register_autograd(_matmul_backward, setup_context=_matmul_setup)


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
    a, b = autocast_cast("matmul", a, b)
    qa = quant(a, "a", "heads") if b.requires_grad else None
    qb = quant(b, "b", "heads") if a.requires_grad else None
    return torch.ops.ev_mesa.matmul(a, b, *parts(qa), *parts(qb))


# ---------------------------------------------------------------------------------------------
# scaled dot-product attention


def _rng_state(device: torch.device) -> Tensor:
    if device.type == "cuda":
        return torch.cuda.get_rng_state(device)
    return torch.get_rng_state()


@torch.library.custom_op(
    f"{NAMESPACE}::sdpa", mutates_args=(), tags=(torch.Tag.nondeterministic_seeded,)
)
def sdpa_op(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None,
    q_codes: Tensor,
    q_step: Tensor,
    q_min: Tensor,
    k_codes: Tensor,
    k_step: Tensor,
    k_min: Tensor,
    v_codes: Tensor,
    v_step: Tensor,
    v_min: Tensor,
    dropout_p: float,
    is_causal: bool,
    scale: float | None,
    enable_gqa: bool,
) -> tuple[Tensor, Tensor]:
    """``F.scaled_dot_product_attention`` and the random-generator state it started from
    (empty without dropout): backward recomputes attention from the q/k/v codes and replays
    the dropout mask."""
    rng = (
        _rng_state(q.device) if dropout_p > 0.0 else q.new_empty(0, dtype=torch.uint8, device="cpu")
    )
    options: dict[str, Any] = {"enable_gqa": True} if enable_gqa else {}
    with kernel(q.device.type):
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=dropout_p,
            is_causal=is_causal,
            scale=scale,
            **options,
        )
    return out, rng


@sdpa_op.register_fake
def _(q, k, v, mask, *rest):  # type: ignore[no-untyped-def]
    dropout_p, is_causal, scale, enable_gqa = rest[9:]
    size = _rng_state(q.device).numel() if dropout_p > 0.0 else 0
    options: dict[str, Any] = {"enable_gqa": True} if enable_gqa else {}
    with kernel(q.device.type):  # the real op's meta kernel: its output strides
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale, **options
        )
    return out, torch.empty(size, dtype=torch.uint8, device="cpu")


def _sdpa_setup(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor]) -> None:
    q, k, v, mask, *codes = inputs[:13]
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(*codes, mask, output[1])
    ctx.meta = ((q.shape, k.shape, v.shape), (q.dtype, k.dtype, v.dtype), q.device)
    dropout_p, is_causal, scale, enable_gqa = inputs[13:]
    ctx.options = {"dropout_p": dropout_p, "is_causal": is_causal, "scale": scale}
    if enable_gqa:
        ctx.options["enable_gqa"] = True


def _sdpa_backward(ctx: Any, grad: Tensor, _rng_grad: Any) -> tuple[Tensor | None, ...]:
    *codes, mask, rng = ctx.saved_tensors
    shapes, dtypes, device = ctx.meta
    needs = ctx.needs_input_grad[:4]
    cd = grad.dtype
    leaves = [
        dq(codes[3 * i], codes[3 * i + 1], codes[3 * i + 2], shapes[i], dtypes[i])
        .to(cd)
        .requires_grad_(needs[i])
        for i in range(3)
    ]
    mask_leaf = None if mask is None else mask.detach().requires_grad_(bool(needs[3]))
    replay = rng.numel() > 0
    devices = [device.index if device.index is not None else 0] if device.type == "cuda" else []
    with (
        torch.enable_grad(),
        kernel(device.type),
        torch.random.fork_rng(devices=devices, enabled=replay),
    ):
        if replay:  # the same dropout mask as the forward (eager only: see handle_sdpa)
            if device.type == "cuda":
                torch.cuda.set_rng_state(rng, device)
            else:
                torch.set_rng_state(rng)
        m = mask_leaf
        if m is not None and m.is_floating_point():
            m = m.to(cd)
        q, k, v = leaves
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=m, **ctx.options)
        inputs = [t for t, n in zip([*leaves, mask_leaf], needs) if n and t is not None]
        grads = iter(torch.autograd.grad(out, inputs, grad))
    result: list[Tensor | None] = []
    for i, (t, n) in enumerate(zip([*leaves, mask_leaf], needs)):
        if not n or t is None:
            result.append(None)
            continue
        gr = next(grads)
        result.append(gr.to(dtypes[i]) if i < 3 else gr)
    return (*result, *([None] * 13))


sdpa_op.register_autograd(_sdpa_backward, setup_context=_sdpa_setup)


def handle_sdpa(
    func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], quant: Quantizer
) -> Any:
    """``F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal, scale, ...)``.

    With dropout under ``torch.compile`` the original op runs (its backward replays the
    random-generator state, which a compiled backward cannot do).
    """
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
        or (float(b["dropout_p"]) > 0.0 and torch.compiler.is_compiling())
    ):
        return PASS
    q, k, v = autocast_cast("sdpa", b["query"], b["key"], b["value"])
    out, _ = torch.ops.ev_mesa.sdpa(
        q,
        k,
        v,
        b["attn_mask"],
        *parts(quant(q, "q", "heads")),
        *parts(quant(k, "k", "heads")),
        *parts(quant(v, "v", "heads")),
        float(b["dropout_p"]),
        bool(b["is_causal"]),
        None if b["scale"] is None else float(b["scale"]),
        bool(b["enable_gqa"]),
    )
    return out


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
