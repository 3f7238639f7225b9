"""``torch.compile`` recipe for the ev models: one call that applies the settings that were
measured to matter (BENCHMARKS.md, issue 16).

* ``fullgraph=True``: the LIT/LITv2 forwards trace without graph breaks.
* **Dynamic batch without recompiles.** The batch dimension of every input is marked dynamic
  and the graph is traced *size-obliviously*
  (``torch.fx.experimental._config.backed_size_oblivious``), so batch 1 shares the graph of
  batch 8 and 32. By default dynamo specialises sizes 0 and 1, and the first call with batch 1
  would compile a second graph. (The layers keep their graphs free of the ops whose shape
  rules still guard on ``batch >= 2``: under compile the stem and DTM offset convs are GEMMs,
  the depth-wise conv calls oneDNN's fused op for inference (a sum of shifted taps with
  gradients on or off the CPU), and no
  ``select`` follows a permute.)
* ``mode="inference"``: inductor ``freezing`` (weights become constants: folded, cast and
  pre-packed for oneDNN, bias/activation epilogues fused). The model is put in eval mode and
  every call runs under ``torch.no_grad()``; weights changed after the first call are **not**
  seen (compile again). ``mode="training"``: no freezing, gradients flow.

Usage::

    import timm, torch, ev_core
    from ev_core.models import compile_model

    model = timm.create_model("litv2_s")
    fast = compile_model(model)  # inference
    with torch.autocast("cpu", dtype=torch.bfloat16):  # optional
        logits = fast(images)  # batch 1, 8, 32, ... one graph
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ev_core.errors import EvError

__all__ = ["MODES", "CompiledModel", "compile_model"]

MODES = ("inference", "training")


class CompiledModel(nn.Module):
    """A compiled model that marks each input's batch dimension dynamic and traces it
    size-obliviously (see the module docstring); returned by :func:`compile_model`.

    Attributes:
        model: the original module (its parameters are shared).
        compiled: the ``torch.compile`` wrapper of ``model``.
        mode: ``"inference"`` or ``"training"``.
        dynamic_batch: whether dim 0 of tensor inputs is marked dynamic.
        freezing: whether inductor freezes the weights (inference with inductor).
    """

    compiled: Callable[..., Any]

    def __init__(
        self,
        model: nn.Module,
        compiled: Callable[..., Any],
        mode: str,
        dynamic_batch: bool,
        freezing: bool,
    ) -> None:
        super().__init__()
        self.model = model
        # not a submodule: the state dict holds the model's tensors once (``model.*``)
        self.__dict__["compiled"] = compiled
        self.mode = mode
        self.dynamic_batch = dynamic_batch
        self.freezing = freezing

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        import torch._inductor.config as inductor_config
        import torch.fx.experimental._config as fx_config

        if self.dynamic_batch:
            for a in (*args, *kwargs.values()):
                if isinstance(a, Tensor) and a.dim() > 0:
                    torch._dynamo.maybe_mark_dynamic(a, 0)
        # Both are read while tracing (a recompile traces again), so they are set for every
        # call: dynamo itself reads ``freezing`` to turn parameters into graph constants
        # (``torch.compile(options={"freezing": True})`` alone reaches inductor too late).
        with (
            fx_config.patch(backed_size_oblivious=self.dynamic_batch),  # type: ignore[attr-defined]
            inductor_config.patch(freezing=self.freezing),
            torch.set_grad_enabled(self.mode == "training" and torch.is_grad_enabled()),
        ):
            return self.compiled(*args, **kwargs)


def compile_model(
    model: nn.Module,
    mode: str = "inference",
    *,
    dynamic_batch: bool = True,
    backend: str | Callable[..., Any] = "inductor",
    options: dict[str, Any] | None = None,
    **compile_kwargs: Any,
) -> CompiledModel:
    """``torch.compile`` an ev model with the settings measured to work best.

    Args:
        model: e.g. ``timm.create_model("litv2_s")``.
        mode: ``"inference"`` (eval mode, no grad, inductor ``freezing``) or ``"training"``.
        dynamic_batch: one graph for every batch size, batch 1 included (see module docstring).
        backend: ``torch.compile`` backend (``"aot_eager"`` for quick checks).
        options: inductor options (``torch.compile(options=...)``); ``"freezing"`` overrides
            the recipe's choice (on for inference with inductor).
        **compile_kwargs: further ``torch.compile`` keywords (``fullgraph`` defaults to True).

    Returns:
        A :class:`CompiledModel` (compiles on its first call).

    Raises:
        EvError: unknown ``mode``.
    """
    if mode not in MODES:
        raise EvError(f"compile_model: mode must be one of {MODES}, got {mode!r}")
    if mode == "inference":
        model.eval()
    opts = dict(options or {})
    freezing = bool(opts.pop("freezing", mode == "inference")) and backend == "inductor"
    compile_kwargs.setdefault("fullgraph", True)
    if opts:
        compile_kwargs["options"] = opts
    compiled = torch.compile(model, backend=backend, **compile_kwargs)
    return CompiledModel(model, compiled, mode, dynamic_batch, freezing)
