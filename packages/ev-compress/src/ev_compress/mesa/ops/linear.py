"""Linear family: ``F.linear`` (``ev_mesa::linear``, saving the 8-bit input, or nothing when the
input is a layer norm or GELU/SiLU output that backward rebuilds from the codes that op saved)
and the
``addmm``/``baddbmm``/``mm`` products (their saved operands compressed by the saved-tensor
hooks)."""

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
    autocast_dtype,
    dq,
    dq_gelu,
    dq_layer_norm,
    kernel,
    to_dtype,
)

__all__ = ["KINDS"]


@torch.library.custom_op(f"{NAMESPACE}::linear", mutates_args=())
def linear_op(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    codes: Tensor | None,
    step: Tensor | None,
    minimum: Tensor | None,
    dtype: torch.dtype | None,
    rebuild: str,
    rebuild_weight: Tensor | None,
    rebuild_bias: Tensor | None,
) -> Tensor:
    """``F.linear(x, weight, bias)`` with the weight and bias cast to ``dtype`` (autocast's cast;
    ``None``: as they are); backward reads ``x`` from codes (given when the weight needs a
    gradient). ``rebuild`` (see :class:`~ev_compress.mesa.ops._library.Derivation`): ``""``,
    the codes are ``x``'s; an activation name, they are the activation's input's and ``x`` its
    output; ``"layer_norm"``, they are a layer norm's normalised input and ``x`` is its output
    (``rebuild_weight``, ``rebuild_bias``: the norm's affine parameters; no gradient flows to
    them here) cast to ``x``'s dtype."""
    with kernel(x.device.type):
        return F.linear(x, to_dtype(weight, dtype), to_dtype(bias, dtype))


@linear_op.register_fake
def _(x, weight, bias, codes, step, minimum, dtype, *rebuild):  # type: ignore[no-untyped-def]
    with kernel(x.device.type):
        return F.linear(x, to_dtype(weight, dtype), to_dtype(bias, dtype))


def _linear_setup(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    x, weight, bias, codes, step, minimum, _, rebuild, rebuild_weight, rebuild_bias = inputs
    ctx.save_for_backward(codes, step, minimum, weight, rebuild_weight, rebuild_bias)
    ctx.x_meta = (x.shape, x.dtype)
    ctx.rebuild = rebuild
    ctx.b_dtype = bias.dtype if bias is not None else None


def _linear_backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
    codes, step, minimum, weight, rebuild_weight, rebuild_bias = ctx.saved_tensors
    x_shape, x_dtype = ctx.x_meta
    needs = ctx.needs_input_grad
    gx = gw = gb = None
    g = grad.to(x_dtype)
    g2 = g.reshape(-1, g.shape[-1])
    if needs[0]:
        gx = (g @ weight.to(x_dtype)).to(x_dtype)
    if needs[1]:
        x_hat = _rebuilt(
            codes, step, minimum, x_shape, x_dtype, ctx.rebuild, rebuild_weight, rebuild_bias
        )
        gw = (g2.t() @ x_hat.reshape(-1, x_hat.shape[-1])).to(weight.dtype)
    if needs[2]:
        gb = g2.sum(0).to(ctx.b_dtype)
    return gx, gw, gb, *([None] * 7)


def _rebuilt(
    codes: Tensor,
    step: Tensor,
    minimum: Tensor,
    shape: torch.Size,
    dtype: torch.dtype,
    rebuild: str,
    weight: Tensor | None,
    bias: Tensor | None,
) -> Tensor:
    """The linear layer's input (``shape``, ``dtype``) from the codes (see the op's
    ``rebuild``)."""
    if not rebuild:
        return dq(codes, step, minimum, shape, dtype)
    if rebuild == "layer_norm":
        return dq_layer_norm(codes, step, minimum, shape, dtype, weight, bias)
    if rebuild.startswith("gelu:"):
        return dq_gelu(codes, step, minimum, shape, dtype, rebuild[5:])
    if rebuild == "silu":
        return F.silu(dq(codes, step, minimum, shape, dtype))
    raise ValueError(f"unknown rebuild {rebuild!r}")


linear_op.register_autograd(_linear_backward, setup_context=_linear_setup)


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
    weight = b["weight"]
    dtype = autocast_dtype("linear", weight.device.type)
    x = to_dtype(b["input"], dtype)
    qx, derivation = None, None
    if weight.requires_grad:
        derivation = quant.derived(b["input"])
        if derivation is not None and x is not b["input"] and derivation.rebuild != "layer_norm":
            derivation = None  # an activation output cast by autocast: quantise the cast
        if derivation is None:
            qx = quant(x, "input", "channels")
        else:
            qx = derivation.source
            quant.rebuilt("input", x, derivation)
    rebuild: tuple[str, Tensor | None, Tensor | None] = ("", None, None)
    if derivation is not None:
        rebuild = (derivation.rebuild, derivation.weight, derivation.bias)
    return torch.ops.ev_mesa.linear(x, weight, b["bias"], *parts(qx), dtype, *rebuild)


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
