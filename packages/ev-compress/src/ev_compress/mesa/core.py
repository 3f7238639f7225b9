"""``convert``/``revert``: make any model save 8-bit activations, without editing its code.

Design (why a ``TorchFunctionMode`` and no module swapping): every supported op, whether
called by an ``nn`` module (``nn.Linear`` → ``F.linear``), a subclass (timm's ``LayerNorm2d``
→ ``F.layer_norm``) or directly inside a block's ``forward`` (``F.scaled_dot_product_attention``,
``q @ k.transpose(-2, -1)``, ``attn.softmax(-1)``, ``F.gelu``), reaches PyTorch through
``__torch_function__``. One mode, active while the converted model runs, therefore catches all
of them, and module classes, parameter names and ``forward`` code stay untouched: ``revert``
only removes hooks and buffers. Swapping ``nn.Linear`` for a ``MesaLinear`` subclass would
still need the mode for functional calls, and would miss subclasses whose own ``forward``
calls the functional op.

Ownership: forward pre/post hooks on every module keep a (thread-local) stack of the modules
currently running; the mode is entered when the stack becomes non-empty (the outermost call,
or a checkpointed block being recomputed) and left when it empties. An intercepted op belongs
to the innermost running module: the policy's include/exclude patterns are matched against its
name, and its running range/minimum estimates are buffers of that module named
``mesa_<kind><call index>_<operand>_{range,min}`` (e.g. ``blocks.0.attn.mesa_sdpa0_q_range``).
They are created at the first forward (their group count depends on the tensor), saved by
``state_dict``, materialised by ``load_state_dict`` (also before any forward), and optional
when loading (a plain checkpoint loads strictly into a converted model).
"""

from __future__ import annotations

import functools
import threading
import weakref
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils.hooks import RemovableHandle

from ev_compress.mesa.ops import HANDLERS, Quantizer
from ev_compress.mesa.policy import MesaPolicy
from ev_compress.mesa.quant import GroupLayout, Layout, QTensor, make_layout, quantize

__all__ = [
    "MesaSummary",
    "SavedTensorMeter",
    "SlotRecord",
    "convert",
    "is_converted",
    "mesa_disabled",
    "revert",
    "strip_state_dict",
    "summary",
]

_CONTEXT_ATTR = "_mesa_context"
_BUFFER_PREFIX = "mesa_"
_PLAIN_TYPES = (Tensor, nn.Parameter)


@dataclass
class SlotRecord:
    """One compressed tensor of one intercepted call (as last seen).

    Attributes:
        module: qualified name of the owning module.
        kind: op kind (``"linear"``, ``"sdpa"``, ...).
        slot: ``kind`` + call index inside the module's forward.
        operand: role of the tensor (``"input"``, ``"q"``, ...).
        shape: tensor shape.
        dtype: tensor dtype.
        groups: quantisation groups.
        original_bytes: bytes of the tensor in its dtype.
        quantised_bytes: bytes of its codes plus per-group parameters.
    """

    module: str
    kind: str
    slot: str
    operand: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    groups: int
    original_bytes: int
    quantised_bytes: int


@dataclass
class _Frame:
    module: nn.Module
    name: str
    ops: frozenset[str]
    counters: dict[str, int] = field(default_factory=dict)


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
        entry = HANDLERS.get(func)
        if entry is not None and self.context.enabled and torch.is_grad_enabled():
            stack = self.context.stack()
            if stack and entry[0] in stack[-1].ops and all(t in _PLAIN_TYPES for t in types):
                kind, handler = entry
                return handler(func, args, kwargs, self.context.quantizer(stack[-1], kind))
        return func(*args, **kwargs)


class _MesaContext:
    """State of one converted model: policy, hooks, module stack, generators, records."""

    def __init__(self, policy: MesaPolicy) -> None:
        self.policy = policy
        self.enabled = True
        self.handles: list[RemovableHandle] = []
        self.records: dict[tuple[str, str, str], SlotRecord] = {}
        self._local = threading.local()
        self._generators: dict[torch.device, torch.Generator] = {}

    # -- module stack -------------------------------------------------------------------------
    def stack(self) -> list[_Frame]:
        st: list[_Frame] | None = getattr(self._local, "stack", None)
        if st is None:
            st = self._local.stack = []
        return st

    def pre_hook(self, name: str, ops: frozenset[str], module: nn.Module, args: Any) -> None:
        st = self.stack()
        if not st:
            mode = _MesaMode(self)
            mode.__enter__()
            self._local.mode = mode
            self._local.cache = {}
        st.append(_Frame(module, name, ops))

    def post_hook(self, module: nn.Module, args: Any, output: Any) -> None:
        st = self.stack()
        if st and st[-1].module is module:
            st.pop()
        if not st and getattr(self._local, "mode", None) is not None:
            self._local.mode.__exit__(None, None, None)
            self._local.mode = None
            self._local.cache = {}

    # -- quantisation -------------------------------------------------------------------------
    def generator(self, device: torch.device) -> torch.Generator:
        gen = self._generators.get(device)
        if gen is None:
            gen = torch.Generator(device=device)
            seed = self.policy.seed if self.policy.seed is not None else torch.initial_seed()
            gen.manual_seed(seed)
            self._generators[device] = gen
        return gen

    def quantizer(self, frame: _Frame, kind: str) -> Quantizer:
        index = frame.counters.get(kind, 0)
        frame.counters[kind] = index + 1
        slot = f"{kind}{index}"

        def quant(x: Tensor, operand: str, layout: Layout) -> QTensor:
            return self.quantize(frame, kind, slot, operand, layout, x)

        return quant

    def quantize(
        self, frame: _Frame, kind: str, slot: str, operand: str, layout: Layout, x: Tensor
    ) -> QTensor:
        p = self.policy
        gl = make_layout(
            x.shape, layout, channel_groups=p.channel_groups, head_groups=p.head_groups
        )
        cache: dict[int, tuple[Any, int, GroupLayout, QTensor]] = self._local.cache
        if p.reuse:
            hit = cache.get(id(x))
            if hit is not None and hit[0]() is x and hit[1] == x._version and hit[2] == gl:
                return hit[3]
        module = frame.module
        range_name = f"{_BUFFER_PREFIX}{slot}_{operand}_range"
        min_name = f"{_BUFFER_PREFIX}{slot}_{operand}_min"
        running_range = module._buffers.get(range_name)
        running_min = module._buffers.get(min_name)
        initialise = (
            running_range is None
            or running_min is None
            or running_range.shape != (gl.groups,)
            or running_min.shape != (gl.groups,)
        )
        if initialise:
            running_range = torch.empty(gl.groups, dtype=torch.float32, device=x.device)
            running_min = torch.empty(gl.groups, dtype=torch.float32, device=x.device)
            module.register_buffer(range_name, running_range)
            module.register_buffer(min_name, running_min)
        else:
            assert running_range is not None and running_min is not None
            if running_range.device != x.device:
                running_range = running_range.to(x.device)
                running_min = running_min.to(x.device)
                module.register_buffer(range_name, running_range)
                module.register_buffer(min_name, running_min)
        # a checkpointed block recomputed during backward must not update the estimates again
        in_backward = torch._C._current_graph_task_id() != -1
        qt = quantize(
            x,
            gl,
            running_range=running_range,
            running_min=running_min,
            initialise=initialise,
            update=not in_backward,
            momentum=p.momentum,
            bits=p.bits,
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
            cache[id(x)] = (weakref.ref(x), x._version, gl, qt)
        return qt


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
    return key.rsplit(".", 1)[-1].startswith(_BUFFER_PREFIX)


def _materialise_buffers(
    module: nn.Module,
    state_dict: dict[str, Any],
    prefix: str,
    *args: Any,
) -> None:
    """``load_state_dict`` pre-hook: create/resize the module's Mesa buffers found in the dict."""
    for key, value in state_dict.items():
        if not key.startswith(prefix + _BUFFER_PREFIX) or not isinstance(value, Tensor):
            continue
        name = key[len(prefix) :]
        if "." in name:
            continue
        current = module._buffers.get(name)
        if current is None or current.shape != value.shape:
            device = current.device if current is not None else value.device
            module.register_buffer(name, torch.empty_like(value, device=device))


def _forgive_missing(module: nn.Module, incompatible: Any) -> None:
    """``load_state_dict`` post-hook: Mesa estimates are optional in a loaded checkpoint."""
    missing = incompatible.missing_keys
    missing[:] = [k for k in missing if not _is_mesa_key(k)]


def convert(model: nn.Module, policy: MesaPolicy | None = None) -> nn.Module:
    """Make ``model`` store the activations its backward needs in 8 bits (in place).

    The forward pass stays bit-identical; only the tensors saved for backward are quantised
    (see :mod:`ev_compress.mesa`). Parameters, module types and ``state_dict`` parameter keys are
    unchanged; running range estimates are added as ``mesa_*`` buffers at the first forward.
    Convert before wrapping in DDP or ``torch.compile``.

    Args:
        model: any ``nn.Module`` (timm or ev model).
        policy: what to compress; default :class:`MesaPolicy` (everything supported).

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
        ops = policy.ops_for(name)
        ctx.handles.append(
            module.register_forward_pre_hook(functools.partial(ctx.pre_hook, name, ops))
        )
        ctx.handles.append(module.register_forward_hook(ctx.post_hook, always_call=True))
        ctx.handles.append(module.register_load_state_dict_pre_hook(_materialise_buffers))
    ctx.handles.append(model.register_load_state_dict_post_hook(_forgive_missing))
    model.__dict__[_CONTEXT_ATTR] = ctx
    return model


def revert(model: nn.Module) -> nn.Module:
    """Undo :func:`convert` in place: remove the hooks and every ``mesa_*`` buffer.

    Returns:
        ``model``, whose ``state_dict`` keys and behaviour are those before conversion.
    """
    ctx = _context(model)
    for handle in ctx.handles:
        handle.remove()
    for module in model.modules():
        for name in [b for b in module._buffers if b.startswith(_BUFFER_PREFIX)]:
            del module._buffers[name]
    del model.__dict__[_CONTEXT_ATTR]
    return model


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


class SavedTensorMeter:
    """Counts the bytes autograd saves for backward inside a ``with`` block.

    Tensors are de-duplicated by storage (views of one tensor count once); storages of the
    ``exclude`` tensors (typically the model's parameters, kept anyway by the model, also when
    an op saves a view such as ``weight.t()``) are not counted. Casted copies of parameters
    (autocast's bf16 weights) are counted: they are extra memory held for backward.

    Args:
        exclude: tensors whose storages are not counted (e.g. ``model.parameters()``).

    Attributes:
        total_bytes: bytes of the distinct storages saved so far.
        by_dtype: the same split by dtype.
    """

    def __init__(self, exclude: Iterable[Tensor] = ()) -> None:
        self._exclude = {t.untyped_storage().data_ptr() for t in exclude}
        self._storages: dict[int, tuple[int, torch.dtype]] = {}
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _pack(self, t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr != 0 and ptr not in self._exclude:
            self._storages[ptr] = (storage.nbytes(), t.dtype)
        return t

    @staticmethod
    def _unpack(t: Tensor) -> Tensor:
        return t

    @property
    def total_bytes(self) -> int:
        return sum(n for n, _ in self._storages.values())

    @property
    def by_dtype(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for n, dtype in self._storages.values():
            key = str(dtype).replace("torch.", "")
            out[key] = out.get(key, 0) + n
        return out

    def __enter__(self) -> SavedTensorMeter:
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._ctx.__exit__(*exc)


@dataclass
class MesaSummary:
    """What a converted model compresses (see :func:`summary`).

    Attributes:
        policy: the policy used.
        slots: the compressed tensors seen in the forward passes so far.
        baseline_saved_bytes: measured saved-for-backward bytes without Mesa (with an example).
        mesa_saved_bytes: the same with Mesa.
    """

    policy: MesaPolicy
    slots: list[SlotRecord]
    baseline_saved_bytes: int | None = None
    mesa_saved_bytes: int | None = None

    @property
    def original_bytes(self) -> int:
        """Bytes the compressed tensors have in their own dtype."""
        return sum(s.original_bytes for s in self.slots)

    @property
    def quantised_bytes(self) -> int:
        """Bytes Mesa keeps for them instead."""
        return sum(s.quantised_bytes for s in self.slots)

    def counts(self) -> dict[str, int]:
        """Number of compressed calls per op kind."""
        out: dict[str, int] = {}
        seen = set()
        for s in self.slots:
            if (s.module, s.slot) not in seen:
                seen.add((s.module, s.slot))
                out[s.kind] = out.get(s.kind, 0) + 1
        return out

    def __str__(self) -> str:
        p = self.policy
        lines = [
            f"Mesa policy: ops={', '.join(p.ops)}; include={list(p.include)}; "
            f"exclude={list(p.exclude)}; bits={p.bits}; channel_groups={p.channel_groups}; "
            f"head_groups={p.head_groups or 'per head'}; momentum={p.momentum}; "
            f"stochastic_rounding={p.stochastic_rounding}",
        ]
        if not self.slots:
            lines.append("no compressed op seen yet: run a training forward (or pass an example)")
            return "\n".join(lines)
        lines.append("")
        lines.append("| module | call | tensor | shape | dtype | groups | bytes → Mesa |")
        lines.append("|---|---|---|---|---|---|---|")
        for s in self.slots:
            shape = "×".join(str(d) for d in s.shape)
            dtype = str(s.dtype).replace("torch.", "")
            lines.append(
                f"| {s.module or '(root)'} | {s.slot} | {s.operand} | {shape} | {dtype} | "
                f"{s.groups} | {_fmt_bytes(s.original_bytes)} → {_fmt_bytes(s.quantised_bytes)} |"
            )
        counts = ", ".join(f"{k}: {v}" for k, v in sorted(self.counts().items()))
        lines.append("")
        lines.append(f"compressed calls: {counts}")
        ratio = self.quantised_bytes / max(self.original_bytes, 1)
        lines.append(
            f"compressed tensors: {_fmt_bytes(self.original_bytes)} → "
            f"{_fmt_bytes(self.quantised_bytes)} ({ratio:.1%})"
        )
        if self.baseline_saved_bytes is not None and self.mesa_saved_bytes is not None:
            ratio = self.mesa_saved_bytes / max(self.baseline_saved_bytes, 1)
            lines.append(
                f"measured saved-for-backward activations: "
                f"{_fmt_bytes(self.baseline_saved_bytes)} → {_fmt_bytes(self.mesa_saved_bytes)} "
                f"({ratio:.1%}, expected saving {1 - ratio:.1%})"
            )
        return "\n".join(lines)


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    raise AssertionError("unreachable")


def summary(model: nn.Module, example_input: Tensor | None = None) -> MesaSummary:
    """What the converted ``model`` compresses and the expected activation saving.

    Args:
        model: a converted model.
        example_input: optional input; when given, one forward with gradients is run with and
            without Mesa and the saved-for-backward bytes of both are measured (parameters
            excluded, see :class:`SavedTensorMeter`); buffers that existed before (norm
            statistics, Mesa estimates) are restored afterwards.

    Returns:
        A :class:`MesaSummary`; ``str()`` of it is a readable table.
    """
    ctx = _context(model)
    baseline = mesa = None
    if example_input is not None:
        buffers = [(b, b.clone()) for b in model.buffers()]
        params = list(model.parameters())
        with torch.enable_grad():
            with mesa_disabled(model), SavedTensorMeter(params) as meter_base:
                model(example_input)
            with SavedTensorMeter(params) as meter_mesa:
                model(example_input)
        baseline, mesa = meter_base.total_bytes, meter_mesa.total_bytes
        with torch.no_grad():  # undo the probe's updates (norm statistics, first Mesa estimates)
            for buf, saved in buffers:
                buf.copy_(saved)
    slots = sorted(ctx.records.values(), key=lambda s: (s.module, s.slot, s.operand))
    return MesaSummary(ctx.policy, slots, baseline, mesa)
