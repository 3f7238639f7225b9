"""Mesa autograd functions: exact forward, 8-bit saved tensors, backward from dequantised values.

Every function's ``forward`` calls the *original* op with the caller's arguments, so the
output is bit-identical to the unconverted op (under autocast too: the op casts as usual). What
it keeps for backward is quantised by the ``quant`` callback (:class:`Quantizer`); ``backward``
dequantises and applies the op's own gradient formula (mostly the ATen backward kernels) in
the dtype the forward computed in, with autocast disabled. All saved tensors go through
``ctx.save_for_backward`` so ``saved_tensors_hooks`` and checkpointing see them.

Each ``handle_*`` function takes the intercepted call ``(func, args, kwargs)`` and a quantiser,
and either runs the Mesa function or, when the call is outside what it supports (no tensor
needs a gradient, an argument pattern it does not know), the original ``func`` unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

from ev_compress.mesa.quant import Layout, QTensor, dequantize, pack_bits, unpack_bits

__all__ = ["HANDLERS", "Quantizer"]


class Quantizer(Protocol):
    """Quantises a tensor that an op saves for backward.

    Args:
        x: the tensor.
        operand: its role (``"input"``, ``"q"``, ...), part of the running-estimate name.
        layout: the grouping rule.
    """

    def __call__(self, x: Tensor, operand: str, layout: Layout) -> QTensor: ...


Handler = Callable[[Callable[..., Any], tuple[Any, ...], dict[str, Any], Quantizer], Any]

# ---------------------------------------------------------------------------------------------
# helpers


def _save(ctx: Any, *items: Tensor | QTensor | None) -> None:
    """``save_for_backward`` of tensors, :class:`QTensor` parts and ``None`` placeholders."""
    tensors: list[Tensor] = []
    spec: list[Any] = []
    for item in items:
        if item is None:
            spec.append(None)
        elif isinstance(item, QTensor):
            spec.append((item.shape, item.dtype))
            tensors.extend((item.data, item.step, item.minimum))
        else:
            spec.append(True)
            tensors.append(item)
    ctx.save_for_backward(*tensors)
    ctx.mesa_spec = spec


def _load(ctx: Any) -> list[Any]:
    it = iter(ctx.saved_tensors)
    out: list[Any] = []
    for s in ctx.mesa_spec:
        if s is None:
            out.append(None)
        elif s is True:
            out.append(next(it))
        else:
            data, step, minimum = next(it), next(it), next(it)
            out.append(QTensor(data, step, minimum, s[0], s[1]))
    return out


@contextmanager
def _no_autocast(device_type: str) -> Iterator[None]:
    """Backward maths runs in explicit dtypes: switch autocast off for the device."""
    if torch.is_autocast_enabled(device_type):
        with torch.autocast(device_type, enabled=False):
            yield
    else:
        yield


def _bind(
    names: Sequence[str], defaults: dict[str, Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> dict[str, Any] | None:
    """Bind a call to parameter names; ``None`` when the call does not fit them."""
    if len(args) > len(names):
        return None
    bound = dict(zip(names, args, strict=False))
    for key, value in kwargs.items():
        if key in bound or key not in names:
            return None
        bound[key] = value
    for name in names:
        if name not in bound:
            if name not in defaults:
                return None
            bound[name] = defaults[name]
    return bound


def _is_float_tensor(t: Any) -> bool:
    return isinstance(t, Tensor) and t.is_floating_point()


def _any_requires_grad(*ts: Any) -> bool:
    return any(isinstance(t, Tensor) and t.requires_grad for t in ts)


def _cast(t: Tensor | None, dtype: torch.dtype | None) -> Tensor | None:
    return None if t is None or dtype is None else t.to(dtype)


# ---------------------------------------------------------------------------------------------
# linear


class _LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: FunctionCtx,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        func: Callable[..., Tensor],
        quant: Quantizer,
    ) -> Tensor:
        out = func(x, weight, bias)
        qx = quant(x, "input", "channels") if weight.requires_grad else None
        _save(ctx, qx, weight)
        c: Any = ctx
        c.meta = (out.dtype, x.dtype, bias.dtype if bias is not None else None, x.device.type)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        qx, weight = _load(ctx)
        cd, x_dtype, b_dtype, dev = ctx.meta
        gx = gw = gb = None
        with _no_autocast(dev):
            g = grad.to(cd)
            g2 = g.reshape(-1, g.shape[-1])
            if ctx.needs_input_grad[0]:
                gx = (g @ weight.to(cd)).to(x_dtype)
            if ctx.needs_input_grad[1]:
                x_hat = dequantize(qx, cd)
                gw = (g2.t() @ x_hat.reshape(-1, x_hat.shape[-1])).to(weight.dtype)
            if ctx.needs_input_grad[2]:
                gb = g2.sum(0).to(b_dtype)
        return gx, gw, gb, None, None


def handle_linear(
    func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], quant: Quantizer
) -> Any:
    """``F.linear(input, weight, bias=None)``."""
    b = _bind(("input", "weight", "bias"), {"bias": None}, args, kwargs)
    if (
        b is None
        or not _is_float_tensor(b["input"])
        or not _any_requires_grad(b["input"], b["weight"], b["bias"])
    ):
        return func(*args, **kwargs)
    return _LinearFn.apply(b["input"], b["weight"], b["bias"], func, quant)


# ---------------------------------------------------------------------------------------------
# convolution


def _expand(value: Any, n: int) -> list[int]:
    if isinstance(value, int):
        return [value] * n
    out = [int(v) for v in value]
    return out * n if len(out) == 1 else out


class _ConvFn(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: FunctionCtx,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        func: Callable[..., Tensor],
        quant: Quantizer,
        call: tuple[Any, Any, Any, int],
        geometry: tuple[list[int], list[int], list[int], int],
    ) -> Tensor:
        stride, padding, dilation, groups = call
        out = func(x, weight, bias, stride, padding, dilation, groups)
        qx = quant(x, "input", "channels") if weight.requires_grad else None
        _save(ctx, qx, weight)
        c: Any = ctx
        b_dtype = bias.dtype if bias is not None else None
        c.meta = (out.dtype, x.dtype, x.shape, b_dtype, x.device.type)
        c.geometry = geometry
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        qx, weight = _load(ctx)
        cd, x_dtype, x_shape, b_dtype, dev = ctx.meta
        stride, padding, dilation, groups = ctx.geometry
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]]
        with _no_autocast(dev):
            g = grad.to(cd)
            x_hat = dequantize(qx, cd) if qx is not None else g.new_empty(1).expand(x_shape)
            w = weight.to(cd)
            gx, gw, gb = torch.ops.aten.convolution_backward(
                g,
                x_hat,
                w,
                [w.shape[0]] if b_dtype is not None else None,
                stride,
                padding,
                dilation,
                False,
                [0] * len(stride),
                groups,
                mask,
            )
        return (
            _cast(gx, x_dtype) if mask[0] else None,
            _cast(gw, weight.dtype) if mask[1] else None,
            _cast(gb, b_dtype) if mask[2] else None,
            None,
            None,
            None,
            None,
        )


def handle_conv(
    func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], quant: Quantizer
) -> Any:
    """``F.conv1d/conv2d/conv3d(input, weight, bias, stride, padding, dilation, groups)``."""
    b = _bind(
        ("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
        {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1},
        args,
        kwargs,
    )
    if (
        b is None
        or not _is_float_tensor(b["input"])
        or not isinstance(b["weight"], Tensor)
        or not _any_requires_grad(b["input"], b["weight"], b["bias"])
    ):
        return func(*args, **kwargs)
    weight: Tensor = b["weight"]
    nd = weight.dim() - 2
    stride, dilation = _expand(b["stride"], nd), _expand(b["dilation"], nd)
    padding_arg = b["padding"]
    if isinstance(padding_arg, str):
        if padding_arg == "valid":
            padding = [0] * nd
        else:  # "same": symmetric only (odd totals pad asymmetrically inside the op)
            totals = [d * (k - 1) for d, k in zip(dilation, weight.shape[2:], strict=True)]
            if any(t % 2 for t in totals):
                return func(*args, **kwargs)
            padding = [t // 2 for t in totals]
    else:
        padding = _expand(padding_arg, nd)
    call = (b["stride"], padding_arg, b["dilation"], b["groups"])
    geometry = (stride, padding, dilation, int(b["groups"]))
    return _ConvFn.apply(b["input"], weight, b["bias"], func, quant, call, geometry)


# ---------------------------------------------------------------------------------------------
# layer norm


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
        if torch.is_autocast_enabled(x.device.type):
            out = func(x, normalized_shape, weight, bias, eps)
            var, mean = torch.var_mean(x.float(), dim=dims, correction=0, keepdim=True)
            rstd = (var + eps).rsqrt()
        else:  # same kernel as F.layer_norm, plus the statistics it computes anyway
            out, mean, rstd = torch.native_layer_norm(x, normalized_shape, weight, bias, eps)
            mean, rstd = mean.float(), rstd.float()
        qx = quant(x, "input", "channels")
        _save(ctx, qx, mean, rstd, weight, bias)
        c: Any = ctx
        c.meta = (x.dtype, normalized_shape, x.device.type)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        qx, mean, rstd, weight, bias = _load(ctx)
        x_dtype, normalized_shape, dev = ctx.meta
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]]
        with _no_autocast(dev):
            gx, gw, gb = torch.ops.aten.native_layer_norm_backward(
                grad.float(),
                dequantize(qx, torch.float32),
                list(normalized_shape),
                mean,
                rstd,
                _cast(weight, torch.float32),
                _cast(bias, torch.float32),
                mask,
            )
        return (
            _cast(gx, x_dtype) if mask[0] else None,
            _cast(gw, weight.dtype if weight is not None else None) if mask[1] else None,
            _cast(gb, bias.dtype if bias is not None else None) if mask[2] else None,
            None,
            None,
            None,
            None,
        )


def handle_layer_norm(
    func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], quant: Quantizer
) -> Any:
    """``F.layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5)``."""
    b = _bind(
        ("input", "normalized_shape", "weight", "bias", "eps"),
        {"weight": None, "bias": None, "eps": 1e-5},
        args,
        kwargs,
    )
    if (
        b is None
        or not _is_float_tensor(b["input"])
        or not _any_requires_grad(b["input"], b["weight"], b["bias"])
    ):
        return func(*args, **kwargs)
    shape = b["normalized_shape"]
    shape = (int(shape),) if isinstance(shape, int) else tuple(int(s) for s in shape)
    return _LayerNormFn.apply(
        b["input"], b["weight"], b["bias"], shape, float(b["eps"]), func, quant
    )


# ---------------------------------------------------------------------------------------------
# batch norm


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
        _save(ctx, qx, mean, invstd, weight)
        c: Any = ctx
        c.meta = (x.dtype, batch_stats, bias.dtype if bias is not None else None, x.device.type)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        qx, mean, invstd, weight = _load(ctx)
        x_dtype, batch_stats, b_dtype, dev = ctx.meta
        with _no_autocast(dev):
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
            _cast(gx, x_dtype),
            _cast(gw, weight.dtype if weight is not None else None)
            if ctx.needs_input_grad[1]
            else None,
            _cast(gb, b_dtype) if ctx.needs_input_grad[2] else None,
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
    b = _bind(
        ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"),
        {"weight": None, "bias": None, "training": False, "momentum": 0.1, "eps": 1e-5},
        args,
        kwargs,
    )
    if (
        b is None
        or not _is_float_tensor(b["input"])
        or b["input"].dim() < 2
        or not _any_requires_grad(b["input"], b["weight"], b["bias"])
    ):
        return func(*args, **kwargs)
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


# ---------------------------------------------------------------------------------------------
# GELU / SiLU


class _GeluFn(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: FunctionCtx, x: Tensor, approximate: str, func: Callable[..., Tensor], quant: Quantizer
    ) -> Tensor:
        out = func(x, approximate=approximate)
        _save(ctx, quant(x, "input", "channels"))
        c: Any = ctx
        c.meta = (out.dtype, x.dtype, approximate, x.device.type)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        (qx,) = _load(ctx)
        cd, x_dtype, approximate, dev = ctx.meta
        with _no_autocast(dev):
            gx = torch.ops.aten.gelu_backward(
                grad.to(cd), dequantize(qx, cd), approximate=approximate
            )
        return gx.to(x_dtype), None, None, None


def handle_gelu(
    func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], quant: Quantizer
) -> Any:
    """``F.gelu(input, approximate='none')``."""
    b = _bind(("input", "approximate"), {"approximate": "none"}, args, kwargs)
    if b is None or not _is_float_tensor(b["input"]) or not b["input"].requires_grad:
        return func(*args, **kwargs)
    return _GeluFn.apply(b["input"], b["approximate"], func, quant)


class _SiluFn(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: FunctionCtx, x: Tensor, inplace: bool, func: Callable[..., Tensor], quant: Quantizer
    ) -> Tensor:
        qx = quant(x, "input", "channels")  # before an in-place op overwrites x
        _save(ctx, qx)
        c: Any = ctx
        c.meta = (x.dtype, x.device.type)
        if inplace:
            func(x, inplace=True)
            ctx.mark_dirty(x)
            return x
        return func(x)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        (qx,) = _load(ctx)
        x_dtype, dev = ctx.meta
        with _no_autocast(dev):
            gx = torch.ops.aten.silu_backward(grad.to(x_dtype), dequantize(qx, x_dtype))
        return gx, None, None, None


def handle_silu(
    func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], quant: Quantizer
) -> Any:
    """``F.silu(input, inplace=False)``."""
    b = _bind(("input", "inplace"), {"inplace": False}, args, kwargs)
    if b is None or not _is_float_tensor(b["input"]) or not b["input"].requires_grad:
        return func(*args, **kwargs)
    return _SiluFn.apply(b["input"], bool(b["inplace"]), func, quant)


# ---------------------------------------------------------------------------------------------
# ReLU (1-bit mask)


class _ReluFn(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: FunctionCtx, x: Tensor, inplace: bool, call: Callable[[Tensor], Tensor]
    ) -> Tensor:
        out = call(x)
        _save(ctx, pack_bits(out > 0))
        c: Any = ctx
        c.shape = out.shape
        if inplace:
            ctx.mark_dirty(x)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        (packed,) = _load(ctx)
        keep = unpack_bits(packed, ctx.shape)
        return grad.masked_fill(~keep, 0), None, None


def handle_relu(
    func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], quant: Quantizer
) -> Any:
    """``F.relu(input, inplace=False)``, ``torch.relu(input)``, ``Tensor.relu()``."""
    b = _bind(("input", "inplace"), {"inplace": False}, args, kwargs)
    if b is None or not _is_float_tensor(b["input"]) or not b["input"].requires_grad:
        return func(*args, **kwargs)
    inplace = bool(b["inplace"])
    if inplace:
        return _ReluFn.apply(b["input"], True, lambda t: func(t, inplace=True))
    return _ReluFn.apply(b["input"], False, lambda t: func(*args, **kwargs))


# ---------------------------------------------------------------------------------------------
# softmax


class _SoftmaxFn(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: FunctionCtx, x: Tensor, dim: int, call: Callable[[Tensor], Tensor], quant: Quantizer
    ) -> Tensor:
        out = call(x)
        _save(ctx, quant(out, "output", "heads"))
        c: Any = ctx
        c.meta = (out.dtype, x.dtype, dim % max(out.dim(), 1), x.device.type)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        (qy,) = _load(ctx)
        out_dtype, x_dtype, dim, dev = ctx.meta
        with _no_autocast(dev):
            gx = torch.ops.aten._softmax_backward_data(
                grad.to(out_dtype), dequantize(qy, out_dtype), dim, x_dtype
            )
        return gx, None, None, None


def handle_softmax(
    func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], quant: Quantizer
) -> Any:
    """``F.softmax(input, dim, _stacklevel, dtype)``, ``torch.softmax``, ``Tensor.softmax``."""
    b = _bind(
        ("input", "dim", "_stacklevel", "dtype"), {"_stacklevel": 3, "dtype": None}, args, kwargs
    )
    if (
        b is None
        or not isinstance(b["dim"], int)
        or not _is_float_tensor(b["input"])
        or not b["input"].requires_grad
    ):
        return func(*args, **kwargs)
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
        _save(ctx, qa, qb)
        c: Any = ctx
        c.meta = (out.dtype, a.dtype, b.dtype, a.device.type)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        qa, qb = _load(ctx)
        cd, a_dtype, b_dtype, dev = ctx.meta
        ga = gb = None
        with _no_autocast(dev):
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
        return func(*args, **kwargs)
    a, b = args
    if (
        not _is_float_tensor(a)
        or not _is_float_tensor(b)
        or a.dim() < 2
        or a.dim() != b.dim()
        or a.shape[:-2] != b.shape[:-2]
        or not _any_requires_grad(a, b)
    ):
        return func(*args, **kwargs)
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
        _save(
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
        qq, qk, qv, mask = _load(ctx)
        cd, dtypes, device, options, func, rng = ctx.meta
        needs = ctx.needs_input_grad[:4]
        leaves = [dequantize(t, cd).requires_grad_(n) for t, n in zip((qq, qk, qv), needs[:3])]
        mask_leaf = None
        if mask is not None:
            mask_leaf = mask.detach().requires_grad_(bool(needs[3]))
        devices = [device.index if device.index is not None else 0] if device.type == "cuda" else []
        with (
            torch.enable_grad(),
            _no_autocast(device.type),
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
    b = _bind(names, defaults, args, kwargs)
    if (
        b is None
        or not all(_is_float_tensor(b[n]) for n in names[:3])
        or not _any_requires_grad(b["query"], b["key"], b["value"], b["attn_mask"])
    ):
        return func(*args, **kwargs)
    options: dict[str, Any] = {
        "dropout_p": float(b["dropout_p"]),
        "is_causal": bool(b["is_causal"]),
        "scale": b["scale"],
    }
    if b["enable_gqa"]:
        options["enable_gqa"] = True
    return _SdpaFn.apply(b["query"], b["key"], b["value"], b["attn_mask"], options, func, quant)


# ---------------------------------------------------------------------------------------------
# registry: intercepted callable -> (op kind, handler)

HANDLERS: dict[Callable[..., Any], tuple[str, Handler]] = {
    F.linear: ("linear", handle_linear),
    F.conv1d: ("conv", handle_conv),
    F.conv2d: ("conv", handle_conv),
    F.conv3d: ("conv", handle_conv),
    F.layer_norm: ("layer_norm", handle_layer_norm),
    F.batch_norm: ("batch_norm", handle_batch_norm),
    F.gelu: ("gelu", handle_gelu),
    F.silu: ("silu", handle_silu),
    F.relu: ("relu", handle_relu),
    torch.relu: ("relu", handle_relu),
    Tensor.relu: ("relu", handle_relu),
    F.softmax: ("softmax", handle_softmax),
    torch.softmax: ("softmax", handle_softmax),
    Tensor.softmax: ("softmax", handle_softmax),
    torch.matmul: ("matmul", handle_matmul),
    Tensor.matmul: ("matmul", handle_matmul),
    Tensor.__matmul__: ("matmul", handle_matmul),
    torch.bmm: ("matmul", handle_matmul),
    Tensor.bmm: ("matmul", handle_matmul),
    F.scaled_dot_product_attention: ("sdpa", handle_sdpa),
}
