"""What every Mesa op family shares: the quantiser protocol, the registry entry type, argument
binding."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

from ev_compress.mesa.ops._library import Derivation, QArgs
from ev_compress.mesa.quant import Layout, QTensor

__all__ = ["PASS", "Handler", "OpKind", "Quantizer"]

#: What a handler returns when it declines a call (an argument pattern it does not support, no
#: gradient needed): the original op then runs, and the saved-tensor hooks compress its saves.
PASS: Any = object()


class Quantizer(Protocol):
    """Quantises the tensors an intercepted call saves for backward (the model's estimates,
    seeds and records behind it).

    ``quant(x, operand, layout)`` quantises ``x`` now (``ev_mesa::quantize``), or returns the
    codes already made for the same tensor in this forward. Ops that quantise a tensor they
    compute themselves (layer norm: the normalised input; softmax: the output) take
    ``quant.args(like, operand, layout)`` (``like``: a tensor of the quantised tensor's shape
    and device) and hand their results to ``quant.commit``. Layer norm and GELU/SiLU note
    their outputs as derived (``quant.derive``): a linear layer taking such an output rebuilds
    it in backward from the codes the norm or activation saved (``quant.derived``) instead of
    quantising it again (with ``MesaPolicy.reuse``).
    """

    def __call__(self, x: Tensor, operand: str, layout: Layout) -> QTensor: ...

    def args(self, like: Tensor, operand: str, layout: Layout) -> QArgs: ...

    def commit(
        self,
        qargs: QArgs,
        operand: str,
        like: Tensor,
        codes: Tensor,
        step: Tensor,
        minimum: Tensor,
        new_range: Tensor,
        new_min: Tensor,
        *,
        reuse: bool,
    ) -> QTensor:
        """Store the new estimates (when they update now) and record the codes of a tensor
        shaped like ``like``; ``reuse``: ``like`` itself was quantised (a later op saving it
        gets these codes)."""
        ...

    def derive(self, y: Tensor, derivation: Derivation) -> None:
        """Note that ``y`` (an op's output) can be rebuilt from another tensor's codes: a
        linear op taking ``y`` then saves no codes of its own."""
        ...

    def derived(self, x: Tensor) -> Derivation | None:
        """The :class:`Derivation` noted for ``x`` by :meth:`derive` in this forward, if any."""
        ...

    def rebuilt(self, operand: str, x: Tensor, derivation: Derivation) -> None:
        """Record that this call's ``operand`` ``x`` is rebuilt from ``derivation`` (no bytes
        of its own)."""
        ...


#: ``handler(func, args, kwargs, quant)`` runs the intercepted call with compressed saves, or
#: returns :data:`PASS`.
Handler = Callable[[Callable[..., Any], tuple[Any, ...], dict[str, Any], Quantizer], Any]


@dataclass(frozen=True)
class OpKind:
    """One op kind of the registry (one policy name).

    Attributes:
        name: the policy's name of the kind (``"linear"``, ``"einsum"``, ...).
        saves: what Mesa stores for backward, in words (shown by ``OP_KINDS``).
        handlers: intercepted callables → handler running a Mesa custom op. Calls
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


def parts(q: QTensor | None) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """A :class:`QTensor` as op arguments ``(codes, step, minimum)`` (``None`` s for none)."""
    return (None, None, None) if q is None else (q.data, q.step, q.minimum)


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
