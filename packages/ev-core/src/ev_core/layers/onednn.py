"""Linear / convolution with a fused bias and activation for CPU inference (oneDNN).

On the CPU, ``F.linear`` copies the bias into the output before an accumulating GEMM and GELU is
a separate pass over the (4× wide) hidden activations; together these were ~20 % of LITv2-S's
CPU forward. oneDNN's pointwise-fused primitives (the ones ``torch.compile`` uses on the CPU,
``torch.ops.mkldnn._linear_pointwise`` / ``_convolution_pointwise``) apply the bias and GELU
inside the GEMM / convolution epilogue.

They are used only where they are exactly a drop-in: eager CPU inference (gradients off) in
float32 or bfloat16, oneDNN available, not while scripting, FX-tracing or compiling (those see
the plain ops; inductor fuses by itself) nor under a ``TorchDispatchMode`` such as the FLOP
counter (:mod:`ev_core.flops`). Under CPU autocast the inputs are cast to the autocast
dtype first, as autocast would. Everything else takes ``F.linear`` / ``F.conv2d`` + ``F.gelu``.
Results equal the plain ops to float rounding (different accumulation order).

Weights in another dtype than the computation (fp32 parameters under bf16 autocast) are cast
once and cached (:func:`cast_weight`) while the parameters are unchanged: the cache is keyed on
each parameter's storage and version counter, so optimizer steps, ``load_state_dict``, in-place
edits and ``param.data = ...`` all invalidate it (an in-place edit through ``param.data``
bypasses the version counter: call :func:`clear_weight_cache` after one). Autocast itself
re-casts every weight on every forward (BENCHMARKS.md, issue 16: what the cache gains).
"""

import typing

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._python_dispatch import _get_current_dispatch_mode
from torch.utils.weak import WeakIdKeyDictionary

__all__ = [
    "cast_weight",
    "clear_weight_cache",
    "compiled_conv_onednn",
    "conv2d_act",
    "conv2d_act_traced",
    "fusable",
    "linear_act",
    "plain_modules",
    "use_onednn",
]

# parameter -> {dtype: ((data_ptr, version) when cast, the cast tensor)}
_CASTS: WeakIdKeyDictionary = WeakIdKeyDictionary()

_ONEDNN = (
    torch.backends.mkldnn.is_available()
    and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    and hasattr(torch.ops.mkldnn, "_convolution_pointwise")
)


@torch.jit.unused
def use_onednn(x: Tensor) -> bool:
    """Whether ``x`` takes the fused oneDNN path (see the module docstring)."""
    if not _ONEDNN or torch.is_grad_enabled():
        return False
    if torch.compiler.is_compiling() or torch.fx._symbolic_trace.is_fx_symbolic_tracing():
        return False
    if _get_current_dispatch_mode() is not None:  # e.g. FlopCounterMode: it sees only plain ops
        return False
    return x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16)


@torch.jit.unused
def fusable(x: Tensor, *modules: nn.Module) -> bool:
    """Whether a layer may run ``modules`` through the fused path for input ``x``: the fused path
    applies (:func:`use_onednn`) and the modules are plain (:func:`plain_modules`)."""
    return use_onednn(x) and plain_modules(*modules)


@torch.jit.unused
def plain_modules(*modules: nn.Module) -> bool:
    """Whether every module is a plain ``nn.Linear`` / ``nn.Conv2d`` / exact ``nn.GELU`` without
    hooks, so that a layer may use its weights directly instead of calling it (a replaced or
    hooked module, e.g. by ev-compress, is called as a module)."""
    for m in modules:
        if (
            type(m) not in (nn.Linear, nn.Conv2d, nn.GELU)
            or m._forward_hooks
            or m._forward_pre_hooks
        ):
            return False
        if isinstance(m, nn.GELU) and m.approximate != "none":
            return False
    return True


@torch.jit.unused
def cast_weight(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """``t.to(dtype)``, cached while ``t`` is unchanged (inference-time weights: detached).

    The cache entry lives as long as ``t`` and is rebuilt when ``t``'s storage or version
    counter changes (see the module docstring).

    Args:
        t: a parameter (or ``None``, e.g. an absent bias).
        dtype: the compute dtype.

    Returns:
        ``t`` itself if already ``dtype``, else the cached cast; ``None`` for ``None``.
    """
    if t is None or t.dtype == dtype:
        return t
    state = (t.data_ptr(), t._version)
    slot = _CASTS.get(t)
    if slot is None:
        slot = _CASTS[t] = {}
    hit = slot.get(dtype)
    if hit is not None and hit[0] == state:
        return hit[1]
    with torch.no_grad():
        out = t.detach().to(dtype)
    slot[dtype] = (state, out)
    return out


def clear_weight_cache() -> None:
    """Drop every cached weight cast (:func:`cast_weight`)."""
    _CASTS.clear()


def _compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype a CPU op on ``x`` computes in now: autocast's, else ``x``'s."""
    return torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype


def _autocast_cast(x: Tensor, *ts: Tensor | None) -> tuple[Tensor, list[Tensor | None]]:
    dt = _compute_dtype(x)
    return x.to(dt), [cast_weight(t, dt) for t in ts]


def _check_act(act: str) -> None:
    if act != "none" and act != "gelu":
        raise ValueError("act must be 'none' or 'gelu', got " + act)


@torch.jit.unused
def _linear_onednn(x: Tensor, weight: Tensor, bias: Tensor | None, act: str) -> Tensor:
    x, (w, b) = _autocast_cast(x, weight, bias)
    alg = "none" if act == "gelu" else ""
    y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), w, b, act, [], alg)
    return y.reshape(*x.shape[:-1], y.shape[-1])


@torch.jit.unused
def _conv2d_onednn(
    x: Tensor, weight: Tensor, bias: Tensor | None, padding: int, groups: int, act: str
) -> Tensor:
    x, (w, b) = _autocast_cast(x, weight, bias)
    return _conv_pointwise(x, typing.cast(Tensor, w), b, padding, groups, act)


def _conv_pointwise(
    x: Tensor, w: Tensor, b: Tensor | None, padding: int, groups: int, act: str
) -> Tensor:
    """oneDNN's fused conv (stride 1, dilation 1) + ``act`` epilogue; operands already cast."""
    alg = "none" if act == "gelu" else ""
    pad, one = [padding, padding], [1, 1]
    return torch.ops.mkldnn._convolution_pointwise(x, w, b, pad, one, one, groups, act, [], alg)


@torch.jit.unused
def compiled_conv_onednn(x: Tensor) -> bool:
    """Whether, under ``torch.compile``, a conv on ``x`` should call oneDNN's fused op
    (:func:`conv2d_act_traced`): CPU, float32/bfloat16 compute, oneDNN available, gradients
    off (the op has no autograd kernel: a backward through it would be silently wrong)."""
    if not _ONEDNN or torch.is_grad_enabled():
        return False
    return x.device.type == "cpu" and _compute_dtype(x) in (torch.float32, torch.bfloat16)


def conv2d_act_traced(
    x: Tensor, weight: Tensor, bias: Tensor | None, padding: int, groups: int, act: str = "none"
) -> Tensor:
    """:func:`conv2d_act` through oneDNN's fused op for ``torch.compile`` graphs (CPU,
    inference only: the op has no autograd kernel; see :func:`compiled_conv_onednn`).

    Unlike ``aten.convolution``, whose fake-tensor rule picks the output memory format from the
    input's strides and so guards on ``batch >= 2`` (batch 1 would recompile a dynamic-batch
    graph), the oneDNN op's rule always returns channels-last. Inductor lowers it to the same
    oneDNN primitive (weights pre-packed under freezing). Under CPU autocast the operands are
    cast to the autocast dtype, as autocast would (the op has no autocast rule); the weight cast
    is folded into a constant under freezing.

    Args/Returns: as :func:`conv2d_act` (``x`` on the CPU, float32/bfloat16 compute).
    """
    _check_act(act)
    dt = _compute_dtype(x)
    b = None if bias is None else bias.to(dt)
    return _conv_pointwise(x.to(dt), weight.to(dt), b, padding, groups, act)


def linear_act(x: Tensor, weight: Tensor, bias: Tensor | None, act: str = "none") -> Tensor:
    """``act(x @ weightᵀ + bias)`` with ``act`` ``"none"`` or ``"gelu"`` (erf GELU).

    Args:
        x: ``[..., C_in]``.
        weight: ``[C_out, C_in]``.
        bias: ``[C_out]`` or ``None``.
        act: ``"none"`` or ``"gelu"``.

    Returns:
        ``[..., C_out]``.
    """
    _check_act(act)
    if not torch.jit.is_scripting() and use_onednn(x):
        return _linear_onednn(x, weight, bias, act)
    y = F.linear(x, weight, bias)
    return F.gelu(y) if act == "gelu" else y


def conv2d_act(
    x: Tensor, weight: Tensor, bias: Tensor | None, padding: int, groups: int, act: str = "none"
) -> Tensor:
    """``act(conv2d(x, weight, bias, stride=1, padding, groups))`` (memory format kept).

    Args:
        x: ``[B, C_in, H, W]`` (e.g. a channels-last view of tokens).
        weight: ``[C_out, C_in / groups, k, k]``.
        bias: ``[C_out]`` or ``None``.
        padding: zero padding on every side.
        groups: convolution groups.
        act: ``"none"`` or ``"gelu"``.

    Returns:
        ``[B, C_out, H', W']``.
    """
    _check_act(act)
    if not torch.jit.is_scripting() and use_onednn(x):
        return _conv2d_onednn(x, weight, bias, padding, groups, act)
    y = F.conv2d(x, weight, bias, padding=padding, groups=groups)
    return F.gelu(y) if act == "gelu" else y
