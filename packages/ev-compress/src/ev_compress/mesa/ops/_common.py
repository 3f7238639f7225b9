"""What every Mesa op family shares: the quantiser protocol, the registry entry type, saving
:class:`~ev_compress.mesa.quant.QTensor` parts through ``save_for_backward``, argument binding."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

from ev_compress.mesa.quant import Layout, QTensor

__all__ = ["PASS", "Handler", "OpKind", "Quantizer"]

#: What a handler returns when it declines a call (an argument pattern it does not support, no
#: gradient needed): the original op then runs, and the saved-tensor hooks compress its saves.
PASS: Any = object()


class Quantizer(Protocol):
    """Quantises a tensor that an op saves for backward.

    Args:
        x: the tensor.
        operand: its role (``"input"``, ``"q"``, ...), part of the running-estimate name.
        layout: the grouping rule.
    """

    def __call__(self, x: Tensor, operand: str, layout: Layout) -> QTensor: ...


#: ``handler(func, args, kwargs, quant)`` runs the intercepted call with compressed saves, or
#: returns :data:`PASS`.
Handler = Callable[[Callable[..., Any], tuple[Any, ...], dict[str, Any], Quantizer], Any]


@dataclass(frozen=True)
class OpKind:
    """One op kind of the registry (one policy name).

    Attributes:
        name: the policy's name of the kind (``"linear"``, ``"einsum"``, ...).
        saves: what Mesa stores for backward, in words (shown by ``OP_KINDS``).
        handlers: intercepted callables → handler running a Mesa autograd function. Calls
            a handler declines (:data:`PASS`), and every callable in ``hooked``, are compressed by
            the saved-tensor hooks instead (whatever autograd saves for them, quantised with
            the channel layout).
        hooked: callables whose saved tensors the saved-tensor hooks quantise.
        custom_functions: ``True`` for the kind that owns tensors saved by custom
            ``torch.autograd.Function`` s (they are saved outside any intercepted call).
    """

    name: str
    saves: str
    handlers: Mapping[Callable[..., Any], Handler] = field(default_factory=dict)
    hooked: tuple[Callable[..., Any], ...] = ()
    custom_functions: bool = False


# ---------------------------------------------------------------------------------------------
# saving QTensors through save_for_backward (so saved_tensors_hooks and checkpointing see them)


def save(ctx: Any, *items: Tensor | QTensor | None) -> None:
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


def load(ctx: Any) -> list[Any]:
    """The items given to :func:`save`, in order."""
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
def no_autocast(device_type: str) -> Iterator[None]:
    """Backward maths runs in explicit dtypes: switch autocast off for the device."""
    if torch.is_autocast_enabled(device_type):
        with torch.autocast(device_type, enabled=False):
            yield
    else:
        yield


def bind(
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


def is_float_tensor(t: Any) -> bool:
    return isinstance(t, Tensor) and t.is_floating_point()


def any_requires_grad(*ts: Any) -> bool:
    return any(isinstance(t, Tensor) and t.requires_grad for t in ts)


def cast(t: Tensor | None, dtype: torch.dtype | None) -> Tensor | None:
    return None if t is None or dtype is None else t.to(dtype)
