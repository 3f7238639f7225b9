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
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._python_dispatch import _get_current_dispatch_mode

__all__ = ["conv2d_act", "fusable", "linear_act", "use_onednn"]

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
    applies (:func:`use_onednn`) and every module is a plain ``nn.Linear`` / ``nn.Conv2d`` /
    exact ``nn.GELU`` without hooks (a replaced or hooked module, e.g. by ev-compress, is called
    as a module instead)."""
    if not use_onednn(x):
        return False
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


def _autocast_cast(x: Tensor, *ts: Tensor | None) -> tuple[Tensor, list[Tensor | None]]:
    if torch.is_autocast_enabled("cpu"):
        dt = torch.get_autocast_dtype("cpu")
        return x.to(dt), [None if t is None else t.to(dt) for t in ts]
    return x, [None if t is None else t.to(x.dtype) for t in ts]


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
    alg = "none" if act == "gelu" else ""
    pad, one = [padding, padding], [1, 1]
    return torch.ops.mkldnn._convolution_pointwise(x, w, b, pad, one, one, groups, act, [], alg)


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
