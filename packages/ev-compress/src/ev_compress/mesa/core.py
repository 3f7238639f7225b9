"""``convert``/``revert``: make any model save 8-bit activations, without editing its code.

Design (why a ``TorchFunctionMode`` and no module swapping): every supported op, whether
called by an ``nn`` module (``nn.Linear`` → ``F.linear``), a subclass (timm's ``LayerNorm2d``
→ ``F.layer_norm``) or directly inside a block's ``forward`` (``F.scaled_dot_product_attention``,
``q @ k.transpose(-2, -1)``, ``attn.softmax(-1)``, ``F.gelu``), reaches PyTorch through
``__torch_function__``. One mode, active while the converted model runs, therefore catches all
of them, and module classes, parameter names and ``forward`` code stay untouched: ``revert``
only removes hooks. Swapping ``nn.Linear`` for a ``MesaLinear`` subclass would still need the
mode for functional calls, and would miss subclasses whose own ``forward`` calls the
functional op. Ops without a Mesa autograd function are compressed by a
``saved_tensors_hooks`` pair installed for the same forward (see :mod:`ev_compress.mesa.ops`).

Ownership: forward pre/post hooks on every module keep a (thread-local) stack of the modules
currently running; the mode is entered when the stack becomes non-empty (the outermost call,
or a checkpointed block being recomputed) and left when it empties. An intercepted op belongs
to the innermost running module: the policy is resolved against its name, and its running
range/minimum estimates are named ``<module>.mesa_<kind><call index>_<operand>_{range,min}``
(e.g. ``blocks.0.attn.mesa_sdpa0_q_range``). They are created at the first training forward
(their group count depends on the tensor), kept by the model's Mesa context (not as
registered buffers, so ``model.buffers()`` and the order of ``state_dict`` entries that EMA
helpers zip over are unchanged), appended at the *end* of ``state_dict``, restored by
``load_state_dict`` and optional when loading.

When the estimates move: compression runs only for modules in training mode with gradients
enabled (``eval()`` forwards run the plain ops). Each estimate is updated at most once per
forward of the whole model: a checkpointed block recomputed inside backward updates it only
if the first forward did not (reentrant checkpointing runs that forward without gradients, so
the recomputation is the one update; non-reentrant checkpointing updates in the forward).
"""

from __future__ import annotations

import functools
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils.hooks import RemovableHandle

from ev_compress.mesa.ops import FUNCTION_KIND, HANDLERS, HOOKED, PASS, Quantizer
from ev_compress.mesa.policy import MesaPolicy, OpSettings
from ev_compress.mesa.quant import GroupLayout, Layout, QTensor, dequantize, make_layout, quantize
from ev_compress.mesa.records import FullPrecisionRecord, SlotRecord, param_derived

__all__ = [
    "convert",
    "is_converted",
    "mesa_disabled",
    "revert",
    "running_estimates",
    "strip_state_dict",
]

_CONTEXT_ATTR = "_mesa_context"
_PREFIX = "mesa_"
_PLAIN_TYPES = (Tensor, nn.Parameter)
#: Saved tensors the hooks leave alone: fewer elements than this, or a per-row statistic
#: (last dimension 1, e.g. an rms-norm ``rstd``): small, and quantising them would cost
#: accuracy for no memory.
_MIN_NUMEL = 4096


@dataclass
class _Frame:
    module: nn.Module
    name: str
    kinds: frozenset[str]
    active: bool
    counters: dict[str, int] = field(default_factory=dict)


@dataclass
class _Call:
    """The intercepted call running now (what the saved-tensor hooks attribute saves to)."""

    frame: _Frame
    kind: str | None  # None: an op Mesa does not know
    op: str
    slot: str
    settings: OpSettings | None
    reason: str = ""  # why its saves stay in full precision, when kind is None
    saved: int = 0


class _MesaMode(TorchFunctionMode):
    """Routes supported ops run by a converted model to the Mesa autograd functions."""

    def __init__(self, context: _MesaContext) -> None:
        super().__init__()
        self.context = context

    def __torch_function__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        ctx = self.context
        local = ctx._local
        stack: list[_Frame] = local.stack
        if not stack or not ctx.enabled or not torch.is_grad_enabled():
            return func(*args, **kwargs)
        frame = stack[-1]
        if not frame.active:
            return func(*args, **kwargs)
        kind = HOOKED.get(func)
        previous = local.current
        if kind is None or kind not in frame.kinds:
            reason = "no Mesa rule for this op" if kind is None else "excluded by the policy"
            local.current = _Call(frame, None, _op_name(func), "", None, reason)
            try:
                return func(*args, **kwargs)
            finally:
                local.current = previous
        slot, settings = ctx.slot(frame, kind)
        local.current = _Call(frame, kind, _op_name(func), slot, settings)
        try:
            entry = HANDLERS.get(func)
            if entry is not None and settings.enabled and all(t in _PLAIN_TYPES for t in types):
                local.in_op = True
                try:
                    out = entry[1](func, args, kwargs, ctx.quantizer(frame, kind, slot, settings))
                finally:
                    local.in_op = False
                if out is not PASS:
                    return out
            return func(*args, **kwargs)
        finally:
            local.current = previous


def _op_name(func: Any) -> str:
    name = getattr(func, "__name__", None) or repr(func)
    return "max_pool" if name == "fn" else name  # F.max_pool*d are boolean_dispatch wrappers


class _MesaContext:
    """State of one converted model: policy, hooks, estimates, module stack, records."""

    def __init__(self, policy: MesaPolicy) -> None:
        self.policy = policy
        self.enabled = True
        self.handles: list[RemovableHandle] = []
        self.records: dict[tuple[str, str, str], SlotRecord] = {}
        self.fp_records: dict[tuple[str, str, int], FullPrecisionRecord] = {}
        self.estimates: dict[str, tuple[Tensor, Tensor]] = {}
        self.generation = 0
        self._updated: dict[str, int] = {}
        self._settings: dict[tuple[str, str], OpSettings] = {}
        self._generators: dict[str, torch.Generator] = {}
        self._local = self._new_local()

    # -- pickling / deepcopy (copy.deepcopy, torch.save(model), timm ModelEmaV3) -------------
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        del state["_local"]  # per-thread forward state; empty between forwards
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._local = self._new_local()

    @staticmethod
    def _new_local() -> threading.local:
        return _Local()

    # -- module stack -------------------------------------------------------------------------
    def pre_hook(self, name: str, kinds: frozenset[str], module: nn.Module, args: Any) -> None:
        local = self._local
        st: list[_Frame] = local.stack
        if not st:
            in_backward = torch._C._current_graph_task_id() != -1
            if not in_backward:
                self.generation += 1
                local.kind_counts = {}
            mode = _MesaMode(self)
            mode.__enter__()
            local.mode = mode
            local.cache = {}
            local.seen = set()
            outer = _top_saved_tensors_hooks()
            if (
                not in_backward
                and self.enabled
                and not _is_checkpoint_hook(outer)
                and not _under_torch_compile()
            ):
                local.outer = outer
                local.params = {
                    t.untyped_storage().data_ptr()
                    for t in (*module.parameters(), *module.buffers())
                }
                hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack)
                hooks.__enter__()
                local.hooks = hooks
        st.append(_Frame(module, name, kinds, module.training))

    def post_hook(self, module: nn.Module, args: Any, output: Any) -> None:
        local = self._local
        st: list[_Frame] = local.stack
        if st and st[-1].module is module:
            st.pop()
        if not st and local.mode is not None:
            if local.hooks is not None:
                local.hooks.__exit__(None, None, None)
                local.hooks = None
            local.mode.__exit__(None, None, None)
            local.mode = None
            local.cache = {}
            local.seen = set()
            local.params = set()
            local.outer = None

    # -- policy ---------------------------------------------------------------------------------
    def slot(self, frame: _Frame, kind: str) -> tuple[str, OpSettings]:
        """Next call slot of ``kind`` in ``frame`` and its resolved settings."""
        index = frame.counters.get(kind, 0)
        frame.counters[kind] = index + 1
        slot = f"{kind}{index}"
        key = (frame.name, slot)
        settings = self._settings.get(key)
        if settings is None:
            counts: dict[str, int] | None = self._local.kind_counts
            position = -1
            if counts is not None:
                position = counts.get(kind, 0)
            settings = self.policy.settings(frame.name, kind, position)
            self._settings[key] = settings
        counts = self._local.kind_counts
        if counts is not None and torch._C._current_graph_task_id() == -1:
            counts[kind] = counts.get(kind, 0) + 1
        return slot, settings

    # -- quantisation -------------------------------------------------------------------------
    def generator(self, device: torch.device) -> torch.Generator:
        gen = self._generators.get(str(device))
        if gen is None:
            gen = torch.Generator(device=device)
            seed = self.policy.seed if self.policy.seed is not None else torch.initial_seed()
            gen.manual_seed(seed)
            self._generators[str(device)] = gen
        return gen

    def quantizer(self, frame: _Frame, kind: str, slot: str, settings: OpSettings) -> Quantizer:
        def quant(x: Tensor, operand: str, layout: Layout) -> QTensor:
            return self.quantize(frame, kind, slot, operand, layout, x, settings)

        return quant

    def quantize(
        self,
        frame: _Frame,
        kind: str,
        slot: str,
        operand: str,
        layout: Layout,
        x: Tensor,
        settings: OpSettings,
    ) -> QTensor:
        p = self.policy
        gl = make_layout(
            x.shape,
            layout,
            channel_groups=settings.channel_groups,
            head_groups=settings.head_groups,
        )
        local = self._local
        cache: dict[int, tuple[Any, int, GroupLayout, int, QTensor]] = local.cache
        if p.reuse:
            hit = cache.get(id(x))
            if (
                hit is not None
                and hit[0]() is x
                and hit[1] == x._version
                and hit[2] == gl
                and hit[3] == settings.bits
            ):
                return hit[4]
        name = (
            f"{frame.name}.{_PREFIX}{slot}_{operand}"
            if frame.name
            else f"{_PREFIX}{slot}_{operand}"
        )
        est = self.estimates.get(name)
        initialise = est is None or est[0].shape != (gl.groups,) or est[1].shape != (gl.groups,)
        if initialise:
            est = (
                torch.empty(gl.groups, dtype=torch.float32, device=x.device),
                torch.empty(gl.groups, dtype=torch.float32, device=x.device),
            )
            self.estimates[name] = est
        else:
            assert est is not None
            if est[0].device != x.device:
                est = (est[0].to(x.device), est[1].to(x.device))
                self.estimates[name] = est
        # at most one update per forward of the model (see the module docstring)
        update = self._updated.get(name) != self.generation
        self._updated[name] = self.generation
        qt = quantize(
            x,
            gl,
            running_range=est[0],
            running_min=est[1],
            initialise=initialise,
            update=update,
            momentum=settings.momentum,
            bits=settings.bits,
            stochastic=p.stochastic_rounding,
            generator=self.generator(x.device),
        )
        self.records[(frame.name, slot, operand)] = SlotRecord(
            module=frame.name,
            kind=kind,
            slot=slot,
            operand=operand,
            shape=tuple(x.shape),
            dtype=x.dtype,
            groups=gl.groups,
            original_bytes=x.numel() * x.element_size(),
            quantised_bytes=qt.nbytes,
        )
        if p.reuse:
            cache[id(x)] = (weakref.ref(x), x._version, gl, settings.bits, qt)
        return qt

    # -- saved-tensor hooks ---------------------------------------------------------------------
    def _pack(self, t: Tensor) -> Any:
        out = self._compress_saved(t)
        outer = self._local.outer
        if outer is None:
            return out
        # hooks that were active outside the model (a SavedTensorMeter, offloading) still see
        # what is kept: the codes and parameters of a QTensor, or the tensor
        pack, unpack = outer
        if isinstance(out, QTensor):
            parts = (pack(out.data), pack(out.step), pack(out.minimum))
            return _Chained(unpack, parts, (out.shape, out.dtype))
        return _Chained(unpack, (pack(out),), None)

    def _compress_saved(self, t: Tensor) -> Any:
        local = self._local
        st: list[_Frame] = local.stack
        if not st or not self.enabled or not st[-1].active:
            return t
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr in local.params or param_derived(t, local.params):
            return t
        call: _Call | None = local.current
        if local.in_op:  # saved by a Mesa function: codes, or what it keeps in fp
            if t.is_floating_point() and not (t.dim() == 1 and t.numel() <= 1024):  # [G] params
                self._record_fp(st[-1], call.op if call else "?", t, "kept by the Mesa op")
            return t
        if call is None:  # saved outside any intercepted call: a custom autograd Function
            frame = st[-1]
            kind: str | None = FUNCTION_KIND if FUNCTION_KIND in frame.kinds else None
            if kind is None:
                self._record_fp(frame, "autograd.Function", t, "excluded by the policy")
                return t
            slot, settings = self.slot(frame, kind)
            call = _Call(frame, kind, "autograd.Function", slot, settings)
        frame = call.frame
        operand = f"saved{call.saved}"
        call.saved += 1
        if call.kind is None or call.settings is None:
            self._record_fp(frame, call.op, t, call.reason or "no Mesa rule for this op")
            return t
        if not call.settings.enabled:
            self._record_fp(frame, call.op, t, "disabled by the policy")
            return t
        if not t.is_floating_point():
            self._record_fp(frame, call.op, t, "not floating point")
            return t
        if t.numel() < _MIN_NUMEL or (t.dim() >= 2 and t.shape[-1] == 1):
            self._record_fp(frame, call.op, t, "small or per-row statistic")
            return t
        return self.quantize(frame, call.kind, call.slot, operand, "channels", t, call.settings)

    def _record_fp(self, frame: _Frame, op: str, t: Tensor, reason: str) -> None:
        ptr = t.untyped_storage().data_ptr()
        seen: set[int] = self._local.seen
        if ptr in seen:
            return
        seen.add(ptr)
        index = frame.counters.get("fp:" + op, 0)
        frame.counters["fp:" + op] = index + 1
        self.fp_records[(frame.name, op, index)] = FullPrecisionRecord(
            module=frame.name,
            op=op,
            shape=tuple(t.shape),
            dtype=t.dtype,
            nbytes=t.numel() * t.element_size(),
            reason=reason,
        )

    # -- state_dict -----------------------------------------------------------------------------
    def state_dict_hook(
        self, module: nn.Module, state_dict: dict[str, Any], prefix: str, metadata: Any
    ) -> None:
        for name, (rng, mn) in self.estimates.items():
            state_dict[f"{prefix}{name}_range"] = rng
            state_dict[f"{prefix}{name}_min"] = mn

    def load_state_dict_pre_hook(
        self, module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any
    ) -> None:
        found: dict[str, dict[str, Tensor]] = {}
        for key in [k for k in state_dict if k.startswith(prefix) and _is_mesa_key(k)]:
            value = state_dict.pop(key)
            name, _, part = key[len(prefix) :].rpartition("_")
            if part in ("range", "min") and isinstance(value, Tensor):
                found.setdefault(name, {})[part] = value
        for name, parts in found.items():
            if "range" in parts and "min" in parts:
                self.estimates[name] = (
                    parts["range"].detach().float().clone(),
                    parts["min"].detach().float().clone(),
                )
                self._updated.pop(name, None)


class _Local(threading.local):
    """Per-thread forward state of a converted model."""

    def __init__(self) -> None:
        self.stack: list[_Frame] = []
        self.mode: _MesaMode | None = None
        self.hooks: Any = None
        self.cache: dict[int, Any] = {}
        self.seen: set[int] = set()
        self.params: set[int] = set()
        self.current: _Call | None = None
        self.in_op = False
        self.kind_counts: dict[str, int] | None = None
        self.outer: tuple[Any, Any] | None = None


@dataclass
class _Chained:
    """A saved tensor (or QTensor parts) packed again by the hooks active outside the model."""

    unpack: Any
    parts: tuple[Any, ...]
    meta: tuple[torch.Size, torch.dtype] | None


def _unpack(obj: Any) -> Tensor:
    if isinstance(obj, _Chained):
        parts = [obj.unpack(p) for p in obj.parts]
        if obj.meta is None:
            return parts[0]
        obj = QTensor(parts[0], parts[1], parts[2], *obj.meta)
    return dequantize(obj) if isinstance(obj, QTensor) else obj


def _top_saved_tensors_hooks() -> tuple[Any, Any] | None:
    """The saved-tensor hooks active now (outside the model), if any."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top(False) if top is not None else None


def _under_torch_compile() -> bool:
    """Whether a ``torch.compile`` d call is running (its AOT graphs save tensors as views that
    they rebuild with ``as_strided``: the saved-tensor hooks stay off; the Mesa functions of the
    mode still compress at the graph breaks)."""
    get = getattr(torch._C._dynamo.eval_frame, "get_eval_frame_callback", None)
    return get is not None and get() not in (None, False)


def _is_checkpoint_hook(hooks: tuple[Any, Any] | None) -> bool:
    """Inside a non-reentrant checkpoint region the checkpoint owns what is saved."""
    return hooks is not None and getattr(hooks[0], "__module__", "") == "torch.utils.checkpoint"


def _context(model: nn.Module) -> _MesaContext:
    ctx = model.__dict__.get(_CONTEXT_ATTR)
    if ctx is None:
        raise ValueError("model is not Mesa-converted (call ev_compress.mesa.convert first)")
    assert isinstance(ctx, _MesaContext)
    return ctx


def is_converted(model: nn.Module) -> bool:
    """Whether ``model`` was converted by :func:`convert` (and not reverted)."""
    return _CONTEXT_ATTR in model.__dict__


def _is_mesa_key(key: str) -> bool:
    return key.rsplit(".", 1)[-1].startswith(_PREFIX)


def convert(model: nn.Module, policy: MesaPolicy | None = None) -> nn.Module:
    """Make ``model`` store the activations its backward needs in 8 bits (in place).

    The forward pass stays bit-identical; only the tensors saved for backward are quantised
    (see :mod:`ev_compress.mesa`), and only while the model is in training mode with
    gradients enabled. Parameters, buffers, module types and ``state_dict`` parameter keys are
    unchanged; running range estimates appear as ``mesa_*`` entries at the end of
    ``state_dict`` after the first training forward. A converted model can be deep-copied and
    pickled (``copy.deepcopy``, ``torch.save(model)``, ``timm.utils.ModelEmaV3``). Convert
    before wrapping in DDP.

    Args:
        model: any ``nn.Module`` (timm or ev model).
        policy: what to compress; default :class:`MesaPolicy`.

    Returns:
        ``model`` itself.

    Raises:
        ValueError: ``model`` is already converted.
    """
    if is_converted(model):
        raise ValueError("model is already Mesa-converted")
    policy = policy if policy is not None else MesaPolicy()
    ctx = _MesaContext(policy)
    for name, module in model.named_modules():
        kinds = policy.may_compress(name)
        ctx.handles.append(
            module.register_forward_pre_hook(functools.partial(ctx.pre_hook, name, kinds))
        )
        ctx.handles.append(module.register_forward_hook(ctx.post_hook, always_call=True))
    ctx.handles.append(model.register_state_dict_post_hook(functools.partial(ctx.state_dict_hook)))
    ctx.handles.append(
        model.register_load_state_dict_pre_hook(functools.partial(ctx.load_state_dict_pre_hook))
    )
    model.__dict__[_CONTEXT_ATTR] = ctx
    return model


def revert(model: nn.Module) -> nn.Module:
    """Undo :func:`convert` in place: remove the hooks and the running estimates.

    Returns:
        ``model``, whose ``state_dict`` keys and behaviour are those before conversion.
    """
    ctx = _context(model)
    for handle in ctx.handles:
        handle.remove()
    del model.__dict__[_CONTEXT_ATTR]
    return model


def running_estimates(model: nn.Module) -> dict[str, tuple[Tensor, Tensor]]:
    """The running ``(range, minimum)`` estimates of a converted model, by name.

    Names are ``<module>.mesa_<kind><call index>_<operand>``, e.g.
    ``blocks.0.mlp.fc1.mesa_linear0_input``; ``state_dict`` holds them as ``<name>_range`` and
    ``<name>_min``.
    """
    return dict(_context(model).estimates)


@contextmanager
def mesa_disabled(model: nn.Module) -> Iterator[None]:
    """Run a converted model without compression inside the block (a same-model baseline)."""
    ctx = _context(model)
    previous, ctx.enabled = ctx.enabled, False
    try:
        yield
    finally:
        ctx.enabled = previous


def strip_state_dict(state_dict: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``state_dict`` without Mesa's running estimates (to load into a plain model)."""
    return {k: v for k, v in state_dict.items() if not _is_mesa_key(k)}
