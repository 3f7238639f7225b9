"""Custom autograd functions (``torch.autograd.Function`` subclasses called by a model, such as
the deformable token merging fast path of ev's LITv2): what they save with
``ctx.save_for_backward`` is quantised by the saved-tensor hooks. ``Function.apply`` is not
seen by torch-function modes, so these tensors are recognised as saved outside any intercepted
call."""

from __future__ import annotations

from ev_compress.mesa.ops._common import OpKind

__all__ = ["KINDS"]

KINDS = (
    OpKind(
        "function",
        "floating tensors saved by custom autograd Functions (e.g. ev's DTM fast path: its input "
        "and offsets; saved-tensor hooks)",
        custom_functions=True,
    ),
)
