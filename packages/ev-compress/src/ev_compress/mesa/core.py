"""``convert``/``revert``: make any model save 8-bit activations, without editing its code.

Design (why a ``TorchFunctionMode`` and no module swapping): every supported op, whether
called by an ``nn`` module (``nn.Linear`` → ``F.linear``), a subclass (timm's ``LayerNorm2d``
→ ``F.layer_norm``) or directly inside a block's ``forward`` (``F.scaled_dot_product_attention``,
``q @ k.transpose(-2, -1)``, ``attn.softmax(-1)``, ``F.gelu``), reaches PyTorch through
``__torch_function__``. One mode, active while the converted model runs, therefore catches all
of them, and module classes, parameter names and ``forward`` code stay untouched: ``revert``
only removes hooks. Swapping ``nn.Linear`` for a ``MesaLinear`` subclass would still need the
mode for functional calls, and would miss subclasses whose own ``forward`` calls the
functional op. Ops without a Mesa custom op are compressed by a
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
A new estimate starts as NaN (uninitialised) and its first update sets it from the batch.

``torch.compile``: every compressed call is an ``ev_mesa`` custom op (see
:mod:`ev_compress.mesa.ops._library`) and everything else here is plain Python that Dynamo
traces (the module stack, the mode, the policy, the estimate look-ups), so
``torch.compile(model, fullgraph=True)`` captures a converted model in one graph. The
stochastic-rounding noise of a call is seeded by the model's forward counter (an int64 tensor
incremented by each training forward) mixed with the call's position in the forward and the
policy's seed, the same numbers in eager and compiled runs. Under compilation the saved-tensor
hooks are off (the kinds they cover stay full precision there), nothing is recorded for
``summary``, and the first compiled call of a fresh model is traced twice (it creates the
estimates; the second trace reads them).
"""

from __future__ import annotations

import functools
import inspect
import math
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils.hooks import RemovableHandle

from ev_compress.mesa.ops import FUNCTION_KIND, HANDLERS, HOOKED, PASS
from ev_compress.mesa.ops._library import Derivation, QArgs
from ev_compress.mesa.ops._library import q as quantize_call
from ev_compress.mesa.policy import MesaPolicy, ModulePolicy, OpSettings
from ev_compress.mesa.quant import GroupLayout, Layout, QTensor, dequantize, make_layout
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
_FORWARD_ATTR = "forward"
_PREFIX = "mesa_"
_PLAIN_TYPES = (Tensor, nn.Parameter)
#: Saved tensors the hooks leave alone: fewer elements than this, or a per-row statistic
#: (last dimension 1, e.g. an rms-norm ``rstd``): small, and quantising them would cost
#: accuracy for no memory.
_MIN_NUMEL = 4096
#: A call's salt: ``(base seed · stride + call number) mod 2⁶²`` (an int64 op argument).
_SALT_STRIDE = 1_000_003
_SALT_MODULUS = 1 << 62


@dataclass
class _Frame:
    module: nn.Module
    name: str
    kinds: frozenset[str]  # what the policy may compress here (defaults or any rule)
    policy: ModulePolicy
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
    """Routes supported ops run by a converted model to the ``ev_mesa`` custom ops."""

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
        if local.traced and _mutates(func, args, kwargs):
            local.traced = []  # compiled: no version counters to tell what changed, forget all
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


class _Quantizer:
    """The :class:`~ev_compress.mesa.ops.Quantizer` of one intercepted call."""

    def __init__(
        self, ctx: _MesaContext, frame: _Frame, kind: str, slot: str, settings: OpSettings
    ) -> None:
        self.ctx, self.frame, self.kind, self.slot, self.settings = ctx, frame, kind, slot, settings
        self._pending: dict[str, GroupLayout] = {}

    def __call__(self, x: Tensor, operand: str, layout: Layout) -> QTensor:
        return self.ctx.quantize(
            self.frame, self.kind, self.slot, operand, layout, x, self.settings
        )

    def args(self, like: Tensor, operand: str, layout: Layout) -> QArgs:
        qa, gl = self.ctx.qargs(
            self.frame, self.slot, operand, like.shape, like.device, layout, self.settings
        )
        self._pending[operand] = gl
        return qa

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
        gl = self._pending.pop(operand)
        if qargs.update and not self.ctx.probing:
            with torch.no_grad():
                qargs.running_range.copy_(new_range)
                qargs.running_min.copy_(new_min)
        qt = QTensor(codes, step, minimum, like.shape, like.dtype)
        ctx = self.ctx
        ctx.record(self.frame, self.kind, self.slot, operand, like.shape, like.dtype, gl.groups, qt)
        if reuse:
            ctx.remember(like, gl, self.settings.bits, qt)
        return qt

    def derive(self, y: Tensor, derivation: Derivation) -> None:
        self.ctx.derive(y, derivation)

    def derived(self, x: Tensor) -> Derivation | None:
        return self.ctx.derived(x)

    def rebuilt(self, operand: str, x: Tensor, derivation: Derivation) -> None:
        qt = derivation.source
        groups = qt.step.numel()
        self.ctx.record(
            self.frame,
            self.kind,
            self.slot,
            operand,
            x.shape,
            x.dtype,
            groups,
            qt,
            derivation.rebuild,
        )


_INPLACE_DUNDERS = frozenset(
    f"__i{op}__"
    for op in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "and", "or", "xor")
) | {"__ilshift__", "__irshift__", "__imatmul__", "__setitem__"}


def _inplace_positions() -> dict[Any, int]:
    """``torch.nn.functional`` callables with an ``inplace`` parameter → its position."""
    out: dict[Any, int] = {}
    for name in dir(F):
        fn = getattr(F, name)
        if not callable(fn) or name.startswith("_"):
            continue
        try:
            params = list(inspect.signature(fn).parameters)
        except (TypeError, ValueError):
            continue
        if "inplace" in params:
            out[fn] = params.index("inplace")
    return out


_INPLACE_POSITION = _inplace_positions()


@torch._dynamo.assume_constant_result
def _inplace_kind(func: Any) -> int:
    """``-2``: ``func`` modifies its first argument in place by name (``add_``, ``__iadd__``,
    ``__setitem__``); ``k ≥ 0``: it does when positional argument ``k`` (``inplace``) is
    ``True``; ``-1``: neither (a constant for ``torch.compile``: no string methods traced)."""
    name = getattr(func, "__name__", "")
    if (name.endswith("_") and not name.endswith("__")) or name in _INPLACE_DUNDERS:
        return -2
    return _INPLACE_POSITION.get(func, -1)


def _mutates(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether a call may modify a tensor in place (``add_``, ``x += y``, ``x[i] = v``,
    ``inplace=True``, ``out=``)."""
    kind = _inplace_kind(func)
    if kind == -2 or kwargs.get("inplace") is True or kwargs.get("out") is not None:
        return True
    return kind >= 0 and len(args) > kind and args[kind] is True


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
        #: training forwards so far (int64; seeds the stochastic rounding with the call salt)
        self.counter = torch.zeros((), dtype=torch.int64)
        self.base_seed = policy.seed if policy.seed is not None else torch.initial_seed()
        self._settings: dict[tuple[str, str], OpSettings] = {}
        self.probing = False  # a fake-tensor forward creating the estimates (see probe)
        self._init_forward_state()

    def _init_forward_state(self) -> None:
        self._threads = _ThreadState()
        self._traced = _State()
        # one mode object: torch.compile guards on the identity of the modes on the stack
        self._mode = _MesaMode(self)

    @property
    def _local(self) -> _State:
        """The forward state: per thread in eager mode; one plain object in code that
        ``torch.compile`` traces (Dynamo does not carry ``threading.local`` attribute writes
        across a graph break)."""
        return self._traced if torch.compiler.is_compiling() else self._threads

    # -- pickling / deepcopy (copy.deepcopy, torch.save(model), timm ModelEmaV3) -------------
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for name in ("_threads", "_traced", "_mode"):  # forward state: empty between forwards
            del state[name]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_forward_state()

    def probe(self, run: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Create the running estimates (NaN, uninitialised) by one forward on fake tensors: no
        computation, no update of anything else (counter, records, buffers, random state)."""
        from torch._subclasses.fake_tensor import FakeTensorMode
        from torch.utils._pytree import tree_map_only

        mode = FakeTensorMode(allow_non_fake_inputs=True)
        fake_args, fake_kwargs = tree_map_only(Tensor, mode.from_tensor, (args, kwargs))
        self.probing = True
        try:
            with mode:
                run(*fake_args, **fake_kwargs)
        finally:
            self.probing = False
            self._threads = _ThreadState()

    # -- module stack -------------------------------------------------------------------------
    def pre_hook(
        self, name: str, kinds: frozenset[str], policy: ModulePolicy, module: nn.Module, args: Any
    ) -> None:
        self.begin(name, kinds, policy, module, enter_mode=True)

    def post_hook(self, module: nn.Module, args: Any, output: Any) -> None:
        self.end(module)

    def begin(
        self,
        name: str,
        kinds: frozenset[str],
        policy: ModulePolicy,
        module: nn.Module,
        *,
        enter_mode: bool,
    ) -> None:
        """A module's forward starts: push its frame; the outermost one resets the per-forward
        state, counts the step and (with ``enter_mode``) enters the Mesa mode."""
        local = self._local
        st: list[_Frame] = local.stack
        if not st:
            compiling = torch.compiler.is_compiling()
            in_backward = not compiling and torch._C._current_graph_task_id() != -1
            if not in_backward:
                local.kind_counts = {}
                local.updated = set()
                local.calls = 0
                training = self.enabled and module.training and torch.is_grad_enabled()
                if training and not self.probing:
                    with torch.no_grad():
                        self.counter.add_(1)
            local.open = True
            if enter_mode:
                self._mode.__enter__()
                local.mode = self._mode
            local.cache = {}
            local.traced = []
            local.seen = set()
            outer = None if compiling else _top_saved_tensors_hooks()
            if (
                not compiling
                and not in_backward
                and not self.probing
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
        st.append(_Frame(module, name, kinds, policy, module.training))

    def end(self, module: nn.Module) -> None:
        """A module's forward ends: pop its frame; the outermost one leaves what ``begin``
        entered."""
        local = self._local
        st: list[_Frame] = local.stack
        if st and st[-1].module is module:
            st.pop()
        if not st and local.open:
            local.open = False
            if local.hooks is not None:
                local.hooks.__exit__(None, None, None)
                local.hooks = None
            if local.mode is not None:
                local.mode.__exit__(None, None, None)
                local.mode = None
            local.cache = {}
            local.traced = []
            local.seen = set()
            local.params = set()
            local.outer = None

    # -- policy ---------------------------------------------------------------------------------
    def slot(self, frame: _Frame, kind: str) -> tuple[str, OpSettings]:
        """Next call slot of ``kind`` in ``frame`` and its resolved settings (resolved at the
        first call, so that a recomputation inside backward keeps them)."""
        index = frame.counters.get(kind, 0)
        frame.counters[kind] = index + 1
        slot = f"{kind}{index}"
        counts: dict[str, int] | None = self._local.kind_counts
        position = -1 if counts is None else counts.get(kind, 0)
        if torch.compiler.is_compiling():  # traced once per graph: no cache to guard on
            settings = frame.policy.settings(kind, position)
        else:
            key = (frame.name, slot)
            cached = self._settings.get(key)
            if cached is None:
                cached = self._settings[key] = frame.policy.settings(kind, position)
            settings = cached
            if torch._C._current_graph_task_id() != -1:
                return slot, settings
        if counts is not None:
            counts[kind] = position + 1
        return slot, settings

    # -- quantisation -------------------------------------------------------------------------
    def quantizer(self, frame: _Frame, kind: str, slot: str, settings: OpSettings) -> _Quantizer:
        return _Quantizer(self, frame, kind, slot, settings)

    def qargs(
        self,
        frame: _Frame,
        slot: str,
        operand: str,
        shape: torch.Size,
        device: torch.device,
        layout: Layout,
        settings: OpSettings,
    ) -> tuple[QArgs, GroupLayout]:
        """The quantising arguments of one operand: its running estimates (created as NaN at
        first use), whether they update now (once per forward), the seed and salt."""
        gl = make_layout(
            shape, layout, channel_groups=settings.channel_groups, head_groups=settings.head_groups
        )
        name = (
            f"{frame.name}.{_PREFIX}{slot}_{operand}"
            if frame.name
            else f"{_PREFIX}{slot}_{operand}"
        )
        local = self._local
        est = self.estimates.get(name)
        fresh = est is None or est[0].shape != (gl.groups,) or est[1].shape != (gl.groups,)
        if fresh:
            with _real_tensors(self.probing):
                est = (
                    torch.full((gl.groups,), math.nan, dtype=torch.float32, device=device),
                    torch.full((gl.groups,), math.nan, dtype=torch.float32, device=device),
                )
            self.estimates[name] = est
        else:
            assert est is not None
            if est[0].device != device:
                with _real_tensors(self.probing):
                    est = (est[0].to(device), est[1].to(device))
                self.estimates[name] = est
        if self.counter.device != device:
            with _real_tensors(self.probing):
                self.counter = self.counter.to(device)
        # at most one update per forward of the model (see the module docstring)
        updated: set[str] = local.updated
        update = fresh or name not in updated
        updated.add(name)
        local.calls += 1
        args = QArgs(
            running_range=est[0],
            running_min=est[1],
            seed=self.counter,
            salt=(self.base_seed * _SALT_STRIDE + local.calls) % _SALT_MODULUS,
            dim=gl.dim,
            groups=gl.groups,
            bits=settings.bits,
            momentum=settings.momentum,
            update=update,
            stochastic=self.policy.stochastic_rounding,
        )
        return args, gl

    def record(
        self,
        frame: _Frame,
        kind: str,
        slot: str,
        operand: str,
        shape: torch.Size,
        dtype: torch.dtype,
        groups: int,
        qt: QTensor,
        rebuild: str = "",
    ) -> None:
        """Keep what :func:`~ev_compress.mesa.summary` reports (eager forwards only);
        ``rebuild``: the tensor is rebuilt from ``qt`` (another tensor's codes), no bytes."""
        if torch.compiler.is_compiling() or self.probing:
            return
        self.records[(frame.name, slot, operand)] = SlotRecord(
            module=frame.name,
            kind=kind,
            slot=slot,
            operand=operand,
            shape=tuple(shape),
            dtype=dtype,
            groups=groups,
            original_bytes=math.prod(shape) * dtype.itemsize,
            quantised_bytes=0 if rebuild else qt.nbytes,
            rebuilt=rebuild,
        )

    def cached(self, x: Tensor, gl: GroupLayout, bits: int) -> QTensor | None:
        """The codes already made in this forward for ``x`` with this grouping, if any (and
        ``x`` not modified since: eager, its version counter; compiled, no in-place call)."""
        if not self.policy.reuse:
            return None
        if torch.compiler.is_compiling():  # traced: compare the (fake) tensors themselves
            for t, g, b, qt in self._local.traced:
                if t is x and g == gl and b == bits:
                    return qt
            return None
        hit = self._local.cache.get(id(x))
        if hit is None or hit[2] != gl or hit[3] != bits:
            return None
        return hit[4] if hit[0]() is x and hit[1] == x._version else None

    def remember(self, x: Tensor, gl: GroupLayout, bits: int, qt: QTensor) -> None:
        if not self.policy.reuse:
            return
        if torch.compiler.is_compiling():
            self._local.traced.append((x, gl, bits, qt))
        else:
            self._local.cache[id(x)] = (weakref.ref(x), x._version, gl, bits, qt)

    def _derivations_off(self) -> bool:
        """No derivations without ``reuse``, nor inside a non-reentrant checkpoint region: its
        recomputation in backward starts from an empty cache wherever no module encloses the
        checkpointed function, so it could decide otherwise than the original forward (whose
        ``rebuild`` choice the linear op's backward keeps)."""
        if not self.policy.reuse:
            return True
        return not torch.compiler.is_compiling() and _is_checkpoint_hook(_top_saved_tensors_hooks())

    def derive(self, y: Tensor, derivation: Derivation) -> None:
        """Note that ``y`` can be rebuilt in backward from another tensor's codes (a cache
        entry without a layout, which :meth:`cached` never returns)."""
        if self._derivations_off():
            return
        if torch.compiler.is_compiling():
            self._local.traced.append((y, None, None, derivation))
        else:
            self._local.cache[id(y)] = (weakref.ref(y), y._version, None, None, derivation)

    def derived(self, x: Tensor) -> Derivation | None:
        """The :class:`Derivation` noted for ``x`` by :meth:`derive` in this forward, if ``x``
        was not modified since (eager: its version counter; compiled: no in-place call since,
        see :func:`_mutates`)."""
        if self._derivations_off():
            return None
        if torch.compiler.is_compiling():
            for t, g, _, derivation in self._local.traced:
                if t is x and g is None:
                    return derivation
            return None
        hit = self._local.cache.get(id(x))
        if hit is None or hit[2] is not None:
            return None
        return hit[4] if hit[0]() is x and hit[1] == x._version else None

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
        """``x`` quantised by ``ev_mesa::quantize`` (or the codes made for it already)."""
        gl = make_layout(
            x.shape,
            layout,
            channel_groups=settings.channel_groups,
            head_groups=settings.head_groups,
        )
        hit = self.cached(x, gl, settings.bits)
        if hit is not None:
            return hit
        qa, gl = self.qargs(frame, slot, operand, x.shape, x.device, layout, settings)
        codes, step, minimum = quantize_call(x.detach(), *qa.op_args())
        qt = QTensor(codes, step, minimum, x.shape, x.dtype)
        self.record(frame, kind, slot, operand, x.shape, x.dtype, gl.groups, qt)
        self.remember(x, gl, settings.bits, qt)
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
        if local.in_op:  # saved by a Mesa op: codes, or what it keeps in fp
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


class _Entry:
    """The converted model's own ``forward`` (an instance attribute; the class's ``forward`` runs
    inside it): the outermost call enters the Mesa mode here rather than in a forward hook, so
    that ``torch.compile(model)``, which runs a module's hooks outside the frame it compiles,
    traces the mode, the module stack and every op of the model in one frame."""

    def __init__(
        self,
        ctx: _MesaContext,
        module: nn.Module,
        kinds: frozenset[str],
        policy: ModulePolicy,
        previous: Any,
    ) -> None:
        self.ctx, self.module, self.kinds, self.policy = ctx, module, kinds, policy
        self.previous = previous  # an instance-level forward the model had before, if any

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # A top-level call under torch.compile runs this frame eagerly (see _skip_top_frame) and
        # the compiler captures ``run``: a fresh model's estimates are created here first, by a
        # fake-tensor forward, so that the first compilation already reads them (else the first
        # call creates them inside the graph and the second call traces again).
        if (
            not torch.compiler.is_compiling()
            and not self.ctx.estimates
            and self.ctx.enabled
            and self.module.training
            and torch.is_grad_enabled()
            and _under_torch_compile()
        ):
            torch._dynamo.disable(self.ctx.probe)(self.run, args, kwargs)
        return self.run(*args, **kwargs)

    def run(self, *args: Any, **kwargs: Any) -> Any:
        """The model's forward inside the Mesa mode (entered and left in this frame itself:
        ``torch.compile`` then keeps the mode stack right across graph breaks)."""
        ctx, module = self.ctx, self.module
        mode = None if ctx._local.stack else ctx._mode
        ctx.begin("", self.kinds, self.policy, module, enter_mode=False)
        if mode is not None:
            mode.__enter__()
        try:
            if self.previous is not None:
                return self.previous(*args, **kwargs)
            return type(module).forward(module, *args, **kwargs)
        finally:
            if mode is not None:
                mode.__exit__(None, None, None)
            ctx.end(module)

    @property
    def __signature__(self) -> inspect.Signature:
        if self.previous is not None:
            return inspect.signature(self.previous)
        return inspect.signature(functools.partial(type(self.module).forward, self.module))


def _skip_top_frame(code: Any) -> None:
    """Run ``code`` eagerly when it is the top frame under ``torch.compile`` (it is still inlined
    when a compiled caller traces it)."""
    skip = getattr(getattr(torch._dynamo, "eval_frame", None), "skip_code", None)
    if skip is not None:
        skip(code)


class _State:
    """Forward state of a converted model (what the running forward has seen so far)."""

    def __init__(self) -> None:
        self.stack: list[_Frame] = []
        self.open = False  # an outermost forward is running
        self.mode: _MesaMode | None = None  # the mode begin() entered, if it did
        self.hooks: Any = None
        # id → (weakref, version, layout, bits, QTensor); derived tensors (_MesaContext.derive):
        # (weakref, version, None, None, Derivation)
        self.cache: dict[int, Any] = {}
        self.traced: list[Any] = []  # the same under torch.compile, the tensor in place of id
        self.seen: set[int] = set()
        self.params: set[int] = set()
        self.current: _Call | None = None
        self.in_op = False
        self.kind_counts: dict[str, int] | None = None
        self.updated: set[str] = set()  # estimates updated in this forward
        self.calls = 0  # quantised operands in this forward (the salt of the next one)
        self.outer: tuple[Any, Any] | None = None


class _ThreadState(threading.local, _State):
    """:class:`_State` per thread (eager mode)."""


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
    """Whether a ``torch.compile`` d call is running, seen from code that runs eagerly inside it
    (a top frame the compiler skips, code between graph breaks): the saved-tensor hooks stay
    off there (the AOT graphs save tensors as views that they rebuild with ``as_strided``)."""
    get = getattr(torch._C._dynamo.eval_frame, "get_eval_frame_callback", None)
    return get is not None and get() not in (None, False)


@contextmanager
def _real_tensors(inside_fake_mode: bool) -> Iterator[None]:
    """Create real tensors even inside :meth:`_MesaContext.probe`'s fake-tensor mode."""
    if not inside_fake_mode:
        yield
        return
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily():
        yield


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
        if module is model:
            continue
        kinds = policy.may_compress(name)
        hook = functools.partial(ctx.pre_hook, name, kinds, policy.for_module(name))
        ctx.handles.append(module.register_forward_pre_hook(hook))
        ctx.handles.append(module.register_forward_hook(ctx.post_hook, always_call=True))
    ctx.handles.append(model.register_state_dict_post_hook(functools.partial(ctx.state_dict_hook)))
    ctx.handles.append(
        model.register_load_state_dict_pre_hook(functools.partial(ctx.load_state_dict_pre_hook))
    )
    model.__dict__[_FORWARD_ATTR] = _Entry(
        ctx, model, policy.may_compress(""), policy.for_module(""), model.__dict__.get("forward")
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
    entry = model.__dict__.pop(_FORWARD_ATTR)
    if entry.previous is not None:
        model.__dict__[_FORWARD_ATTR] = entry.previous
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


# the eager part of a top-level call under torch.compile, and what it calls
for _code in (_Entry.__call__, _under_torch_compile):
    _skip_top_frame(_code.__code__)
