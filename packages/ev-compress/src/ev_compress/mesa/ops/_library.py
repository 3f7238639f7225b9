"""The ``ev_mesa`` custom-op library: what makes a converted model traceable by ``torch.compile``.

Every Mesa op is a ``torch.library.custom_op`` with a fake kernel, so that Dynamo and AOTAutograd
see one opaque node per compressed call instead of breaking the graph:

* ``ev_mesa::quantize`` (this file) quantises one tensor: per-group codes, step and minimum as
  outputs; it updates the running range/minimum estimates **in place** (``mutates_args``, so the
  compiled graph writes them back exactly as eager does) and draws its stochastic-rounding noise
  from a seed given as a **tensor** (:func:`~ev_compress.mesa.quant.mix_seed` of the model's
  forward counter and the call's salt): no generator object, no host value baked into a graph.
* ``ev_mesa::dequantize`` rebuilds the tensor in backward.
* One functional forward op per family (``ev_mesa::linear``, ``ev_mesa::layer_norm``, ...,
  in the family files) runs the original computation and takes the codes as non-differentiable
  inputs (layer norm and softmax quantise inside and return the new estimates, which the caller
  copies back); ``register_autograd`` saves only codes (plus what the family keeps in fp, e.g.
  the layer-norm ``rstd``), and its backward is traceable torch code around ``dequantize``.

Autocast: a custom op is opaque to autocast (under ``torch.compile`` its kernel would run with
autocast off). Each handler therefore casts the op's activation inputs itself as autocast would
for the original op (:func:`autocast_cast`, policy probed once per op, device type and dtype;
weights are cast inside the linear/conv kernels, so that backward keeps the fp32 parameter and
no bf16 copy), and the kernels run with autocast disabled: eager and compiled calls compute the
same thing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ev_compress.mesa import _fused
from ev_compress.mesa.quant import (
    GroupLayout,
    QTensor,
    dequantize,
    mix_seed,
    mix_seed_int,
    quantize,
)

__all__ = [
    "NAMESPACE",
    "Derivation",
    "QArgs",
    "autocast_cast",
    "autocast_dtype",
    "dequantize_op",
    "dq",
    "dq_gelu",
    "dq_gelu_backward",
    "dq_layer_norm",
    "dq_rows",
    "kernel",
    "q",
    "quantize_internal",
    "quantize_op",
    "to_dtype",
]

#: The torch.library namespace of Mesa's ops (``torch.ops.ev_mesa.*``).
NAMESPACE = "ev_mesa"


@dataclass
class QArgs:
    """How one operand is quantised: the quantising arguments of a Mesa op.

    Attributes:
        running_range: float32 ``[G]`` running range estimate ``α`` (NaN: uninitialised).
        running_min: float32 ``[G]`` running minimum estimate ``β``.
        seed: int64 scalar tensor, the model's forward counter.
        salt: this call's salt (mixed with ``seed`` into the noise seed).
        dim: grouped dimension.
        groups: number of groups.
        bits: code width.
        momentum: ``λ`` of the estimates.
        update: update the estimates with this batch (once per step).
        stochastic: stochastic rounding.
    """

    running_range: Tensor
    running_min: Tensor
    seed: Tensor
    salt: int
    dim: int
    groups: int
    bits: int
    momentum: float
    update: bool
    stochastic: bool

    def op_args(self) -> tuple[Any, ...]:
        """The arguments in the order every ``ev_mesa`` op takes them."""
        return (
            self.running_range,
            self.running_min,
            self.seed,
            self.salt,
            self.dim,
            self.groups,
            self.bits,
            self.momentum,
            self.update,
            self.stochastic,
        )


@dataclass(frozen=True)
class Derivation:
    """How an op's output can be rebuilt in backward from codes another op saved.

    Attributes:
        source: the codes (of a GELU/SiLU input, or of a layer norm's normalised input).
        rebuild: ``"gelu:none"``, ``"gelu:tanh"``, ``"silu"`` (the activation of the source)
            or ``"layer_norm"`` (``source · weight + bias``).
        weight: the layer norm's weight (``None``: none, or not a layer norm).
        bias: the layer norm's bias.
    """

    source: QTensor
    rebuild: str
    weight: Tensor | None = None
    bias: Tensor | None = None


@contextmanager
def kernel(device_type: str) -> Iterator[None]:
    """Inside an op kernel: autocast off (its inputs were cast by the handler)."""
    if torch.is_autocast_enabled(device_type):
        with torch.autocast(device_type, enabled=False):
            yield
    else:
        yield


# ---------------------------------------------------------------------------------------------
# quantise / dequantise


def _quantize_into(
    x: Tensor,
    running_range: Tensor,
    running_min: Tensor,
    seed: Tensor,
    salt: int,
    dim: int,
    groups: int,
    bits: int,
    momentum: float,
    update: bool,
    stochastic: bool,
    *,
    normalize: tuple[Tensor, Tensor] | None = None,
) -> QTensor:
    seed_t = None
    if stochastic:
        if x.device.type == "cpu":  # the same seed as mix_seed, without tensor ops
            seed_t = torch.tensor(mix_seed_int(int(seed), salt), dtype=torch.int64)
        else:  # stays on the device (CUDA kernels read it there)
            seed_t = mix_seed(seed.to(x.device), salt)
    return quantize(
        x,
        GroupLayout(dim, groups),
        running_range=running_range,
        running_min=running_min,
        update=update,
        momentum=momentum,
        bits=bits,
        stochastic=stochastic,
        seed=seed_t,
        normalize=normalize,
    )


def _eager(t: Tensor) -> bool:
    """Whether a plain eager call is running (not Dynamo, AOT or fake tracing): ops without
    autograd then skip the dispatcher round trip and run their kernel directly."""
    return type(t) is Tensor and not torch.compiler.is_compiling()


def _code_shape(shape: torch.Size | tuple[int, ...], dim: int, groups: int) -> tuple[int, ...]:
    return GroupLayout(dim, groups).view_shape(tuple(shape) or (1,))


@torch.library.custom_op(f"{NAMESPACE}::quantize", mutates_args=("running_range", "running_min"))
def quantize_op(
    x: Tensor,
    running_range: Tensor,
    running_min: Tensor,
    seed: Tensor,
    salt: int,
    dim: int,
    groups: int,
    bits: int,
    momentum: float,
    update: bool,
    stochastic: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Quantise ``x`` (see :func:`~ev_compress.mesa.quant.quantize`); updates the estimates in
    place when ``update``. Returns ``(codes uint8 [pre, G, rest], step f32 [G], minimum f32 [G])``."""
    qt = _quantize_into(
        x, running_range, running_min, seed, salt, dim, groups, bits, momentum, update, stochastic
    )
    return qt.data, qt.step, qt.minimum


@quantize_op.register_fake
def _(x, running_range, running_min, seed, salt, dim, groups, bits, momentum, update, stochastic):  # type: ignore[no-untyped-def]
    codes = x.new_empty(_code_shape(x.shape, dim, groups), dtype=torch.uint8)
    return codes, x.new_empty(groups, dtype=torch.float32), x.new_empty(groups, dtype=torch.float32)


def quantize_internal(
    x: Tensor, *qargs: Any, normalize: tuple[Tensor, Tensor] | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """For ops that quantise inside their kernel (a tensor they compute, or ``(x − shift)·scale``
    for ``normalize``, see :func:`~ev_compress.mesa.quant.quantize`): the codes and the new
    estimates as fresh tensors ``(codes, step, minimum, new_range, new_min)``; the inputs are
    not modified (the op stays functional, as ``register_autograd`` requires)."""
    running_range, running_min, *rest = qargs
    new_range, new_min = running_range.clone(), running_min.clone()
    qt = _quantize_into(x, new_range, new_min, *rest, normalize=normalize)
    return qt.data, qt.step, qt.minimum, new_range, new_min


def fake_internal(x: Tensor, *qargs: Any) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Fake-kernel counterpart of :func:`quantize_internal`."""
    running_range, running_min, _, _, dim, groups = qargs[:6]
    codes = x.new_empty(_code_shape(x.shape, dim, groups), dtype=torch.uint8)
    g = x.new_empty(groups, dtype=torch.float32)
    return codes, g, g.clone(), torch.empty_like(running_range), torch.empty_like(running_min)


@torch.library.custom_op(f"{NAMESPACE}::dequantize", mutates_args=())
def dequantize_op(
    codes: Tensor, step: Tensor, minimum: Tensor, shape: list[int], dtype: torch.dtype
) -> Tensor:
    """``codes · step + minimum`` reshaped to ``shape``, in ``dtype``."""
    return dequantize(QTensor(codes, step, minimum, torch.Size(shape), dtype))


@dequantize_op.register_fake
def _(codes, step, minimum, shape, dtype):  # type: ignore[no-untyped-def]
    return codes.new_empty(shape, dtype=dtype)


def dq(codes: Tensor, step: Tensor, minimum: Tensor, shape: Any, dtype: torch.dtype) -> Tensor:
    """``ev_mesa::dequantize`` (the backward formulas' way to read codes)."""
    if _eager(codes):
        return dequantize(QTensor(codes, step, minimum, torch.Size(shape), dtype))
    return torch.ops.ev_mesa.dequantize(codes, step, minimum, list(shape), dtype)


def _fused_reads(codes: Tensor, dtype: torch.dtype) -> bool:
    """Whether an eager backward reads ``codes`` through a fused CPU kernel."""
    return _eager(codes) and _fused.supports_dtype(dtype) and _fused.usable(codes)


def dq_gelu(
    codes: Tensor, step: Tensor, minimum: Tensor, shape: Any, dtype: torch.dtype, approximate: str
) -> Tensor:
    """``F.gelu`` of the dequantised tensor (``shape``, ``dtype``): a GELU's output rebuilt from
    the codes of its input."""
    if _fused_reads(codes, dtype):
        return _fused.dequantize_gelu(codes, step, minimum, dtype, approximate).reshape(shape)
    return F.gelu(dq(codes, step, minimum, shape, dtype), approximate=approximate)


def dq_gelu_backward(
    grad: Tensor, codes: Tensor, step: Tensor, minimum: Tensor, approximate: str
) -> Tensor:
    """``aten.gelu_backward(grad, x̂)``, ``x̂`` the dequantised input of ``grad``'s shape and
    dtype."""
    if _fused_reads(codes, grad.dtype):
        g = grad.reshape(codes.shape)
        return _fused.gelu_backward(g, codes, step, minimum, approximate).reshape(grad.shape)
    x_hat = dq(codes, step, minimum, grad.shape, grad.dtype)
    return torch.ops.aten.gelu_backward(grad, x_hat, approximate=approximate)


def dq_rows(
    codes: Tensor, step: Tensor, minimum: Tensor, shape: Any, dtype: torch.dtype, scale: Tensor
) -> Tensor:
    """The dequantised tensor (``shape``, ``dtype``) with each row of the ``[pre, G, rest]`` codes
    multiplied by its ``scale`` (``pre`` values; each row one row of the last dimension of
    ``shape``): one pass on the fused CPU path."""
    if _fused_reads(codes, dtype):
        rows = scale.float().reshape(-1)
        return _fused.dequantize_rows(codes, step, minimum, rows, dtype).reshape(shape)
    x = dq(codes, step, minimum, shape, dtype)
    return x * scale.to(dtype).reshape(*shape[:-1], 1)


def dq_layer_norm(
    codes: Tensor,
    step: Tensor,
    minimum: Tensor,
    shape: Any,
    dtype: torch.dtype,
    weight: Tensor | None,
    bias: Tensor | None,
) -> Tensor:
    """A layer norm's output (``shape``, ``dtype``) from the codes of its normalised input:
    ``x̂·weight + bias`` computed in float32 (float64 for float64) and cast to ``dtype``. With
    the codes grouped along the normalised last dimension the affine map is folded into the
    dequantisation (``code·(step·w) + (β·w + b)``, one pass; the fused CPU kernel in eager
    mode)."""
    sdt = torch.promote_types(dtype, torch.float32)
    channels = shape[-1]
    per_channel = all(t is None or t.numel() == channels for t in (weight, bias))
    if per_channel and codes.dim() == 3 and codes.shape[1] * codes.shape[2] == channels:
        groups, rest = codes.shape[1], codes.shape[2]
        w = (
            torch.ones(channels, dtype=sdt, device=codes.device)
            if weight is None
            else weight.to(sdt)
        )
        b = torch.zeros(channels, dtype=sdt, device=codes.device) if bias is None else bias.to(sdt)
        w, b = w.reshape(groups, rest), b.reshape(groups, rest)
        scale = step.to(sdt)[:, None] * w
        offset = minimum.to(sdt)[:, None] * w + b
        if _fused_reads(codes, dtype):
            return _fused.dequantize_affine(codes, scale, offset, dtype).reshape(shape)
        return (codes.to(sdt) * scale + offset).to(dtype).reshape(shape)
    # codes grouped another way, or a multi-dimensional normalized_shape: w, b broadcast after
    xn = dq(codes, step, minimum, shape, sdt)
    if weight is not None:
        xn = xn * weight.to(sdt)
    if bias is not None:
        xn = xn + bias.to(sdt)
    return xn.to(dtype)


def q(x: Tensor, *qargs: Any) -> tuple[Tensor, Tensor, Tensor]:
    """``ev_mesa::quantize`` (``x`` detached; ``qargs``: :meth:`QArgs.op_args`)."""
    if _eager(x):
        qt = _quantize_into(x, *qargs)
        return qt.data, qt.step, qt.minimum
    return torch.ops.ev_mesa.quantize(x, *qargs)


# ---------------------------------------------------------------------------------------------
# autocast

#: A tiny call of each original op family (``x``: float ``[2, 4]``), probed under autocast.
_PROBES: dict[str, Callable[[Tensor], Tensor]] = {
    "linear": lambda x: F.linear(x, x),
    "conv": lambda x: F.conv1d(x[None], x.t()[:, :, None]),
    "matmul": lambda x: torch.matmul(x, x.t()),
    "sdpa": lambda x: F.scaled_dot_product_attention(x[None], x[None], x[None]),
    "layer_norm": lambda x: F.layer_norm(x, (4,)),
    "batch_norm": lambda x: F.batch_norm(x, None, None, training=True),
    "softmax": lambda x: torch.softmax(x, -1),
    "gelu": F.gelu,
    "silu": F.silu,
    "relu": torch.relu,
    "avg_pool1d": lambda x: F.avg_pool1d(x[None], 1),
    "avg_pool2d": lambda x: F.avg_pool2d(x[None, None], 1),
    "avg_pool3d": lambda x: F.avg_pool3d(x[None, None, None], 1),
}

_POLICIES: dict[tuple[str, str, torch.dtype], str] = {}


@torch._dynamo.assume_constant_result
def _autocast_policy(name: str, device_type: str, dtype: torch.dtype) -> str:
    """What autocast does to op family ``name`` on ``device_type`` with ``dtype``: ``"lower"``
    (float inputs cast to ``dtype``), ``"fp32"`` (cast to float32) or ``"none"``; found by
    running the op on a tiny input (cached)."""
    key = (name, device_type, dtype)
    policy = _POLICIES.get(key)
    if policy is None:
        probe = _PROBES[name]
        with torch.no_grad(), torch.autocast(device_type, dtype=dtype):
            x = torch.ones(2, 4, device=device_type)
            hi = probe(x).dtype
            lo = probe(x.to(dtype)).dtype
        policy = "lower" if hi == dtype else "fp32" if lo == torch.float32 else "none"
        _POLICIES[key] = policy
    return policy


def autocast_dtype(name: str, device_type: str) -> torch.dtype | None:
    """The dtype autocast would cast the float inputs of op family ``name`` to now (``None``:
    no autocast on ``device_type``, or it leaves this op alone)."""
    if not torch.is_autocast_enabled(device_type):
        return None
    dtype = torch.get_autocast_dtype(device_type)
    policy = _autocast_policy(name, device_type, dtype)
    return None if policy == "none" else torch.float32 if policy == "fp32" else dtype


def to_dtype(t: Tensor | None, dtype: torch.dtype | None) -> Any:
    """``t`` in ``dtype`` as autocast casts it (float tensors except float64; ``None`` passes)."""
    if t is None or dtype is None or not t.is_floating_point() or t.dtype == torch.float64:
        return t
    return t.to(dtype)


def autocast_cast(name: str, *tensors: Tensor | None) -> tuple[Any, ...]:
    """``tensors`` cast as autocast would cast the inputs of op family ``name`` now (unchanged
    without autocast on their device; ``None`` and non-float tensors pass through)."""
    first = next((t for t in tensors if t is not None), None)
    if first is None:
        return tensors
    dtype = autocast_dtype(name, first.device.type)
    return tuple(to_dtype(t, dtype) for t in tensors)
