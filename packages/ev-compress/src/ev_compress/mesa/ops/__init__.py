"""Mesa's op registry: one file per op family, one list of :class:`OpKind` s.

Every family module defines ``KINDS``; :data:`REGISTRY` concatenates them, and both the
dispatch table of the converted model's torch-function mode (:data:`HANDLERS`, :data:`HOOKED`)
and the policy's :data:`OP_KINDS` are derived from it, so a new op is added in one place.

Two mechanisms compress what an op saves for backward:

* **Mesa custom ops** (``OpKind.handlers``, ``torch.ops.ev_mesa.*``, see
  :mod:`ev_compress.mesa.ops._library`): the call is replaced by an op whose forward runs the
  original computation (bit-identical output) and saves 8-bit codes with the layout that
  suits the op (head-wise attention operands, per-token-normalised layer-norm input,
  per-channel-normalised batch-norm input, 1-bit ReLU/dropout masks); backward dequantises.
  These ops are what ``torch.compile`` captures.
* **Saved-tensor hooks** (``OpKind.hooked``, calls a handler passes on, and custom autograd
  functions): while the converted model runs, a ``saved_tensors_hooks`` pair quantises what
  autograd saves for these calls (channel layout) and dequantises it when backward unpacks it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ev_compress.mesa.ops import (
    activation,
    attention,
    conv,
    dropout,
    function,
    linear,
    norm,
    pooling,
)
from ev_compress.mesa.ops._common import PASS, Handler, OpKind, Quantizer

__all__ = [
    "FUNCTION_KIND",
    "HANDLERS",
    "HOOKED",
    "OP_KINDS",
    "PASS",
    "REGISTRY",
    "Handler",
    "OpKind",
    "Quantizer",
]

#: Every op kind Mesa knows, in the order shown to users.
REGISTRY: tuple[OpKind, ...] = (
    *linear.KINDS,
    *conv.KINDS,
    *norm.KINDS,
    *activation.KINDS,
    *attention.KINDS,
    *pooling.KINDS,
    *dropout.KINDS,
    *function.KINDS,
)

#: Op kind name → what Mesa saves for it.
OP_KINDS: dict[str, str] = {k.name: k.saves for k in REGISTRY}

#: Intercepted callable → (op kind, Mesa handler).
HANDLERS: dict[Callable[..., Any], tuple[str, Handler]] = {
    f: (k.name, h) for k in REGISTRY for f, h in k.handlers.items()
}

#: Callable → op kind, for calls whose saved tensors the saved-tensor hooks compress
#: (``hooked`` callables and every handled callable, for the calls its handler passes on).
HOOKED: dict[Callable[..., Any], str] = {
    **{f: k.name for k in REGISTRY for f in k.hooked},
    **{f: k.name for k in REGISTRY for f in k.handlers},
}

#: The op kind owning tensors saved by custom autograd Functions.
FUNCTION_KIND: str = next(k.name for k in REGISTRY if k.custom_functions)

if len(OP_KINDS) != len(REGISTRY):
    raise RuntimeError("duplicate op kind names in the Mesa registry")
