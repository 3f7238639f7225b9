"""``summary``: what a converted model compresses, what it keeps in full precision, and the
measured saving."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ev_compress.mesa.core import _context, mesa_disabled
from ev_compress.mesa.policy import MesaPolicy
from ev_compress.mesa.records import FullPrecisionRecord, SavedTensorMeter, SlotRecord

__all__ = ["MesaSummary", "summary"]


@dataclass
class MesaSummary:
    """What a converted model compresses (see :func:`summary`).

    Attributes:
        policy: the policy used.
        slots: the compressed tensors seen in the training forwards so far.
        full_precision: tensors autograd kept in full precision in those forwards (parameters
            and their casts excepted), with why.
        baseline_saved_bytes: measured saved-for-backward bytes without Mesa (with an example).
        mesa_saved_bytes: the same with Mesa.
    """

    policy: MesaPolicy
    slots: list[SlotRecord]
    full_precision: list[FullPrecisionRecord] = field(default_factory=list)
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

    @property
    def full_precision_bytes(self) -> int:
        """Bytes kept in full precision per training step."""
        return sum(r.nbytes for r in self.full_precision)

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
            f"stochastic_rounding={p.stochastic_rounding}; rules={len(p.rules)}",
        ]
        if not self.slots and not self.full_precision:
            lines.append("no training forward seen yet: run one (or pass an example)")
            return "\n".join(lines)
        lines += ["", "Compressed:", ""]
        lines.append("| module | call | tensor | shape | dtype | groups | bytes → Mesa |")
        lines.append("|---|---|---|---|---|---|---|")
        for s in self.slots:
            lines.append(
                f"| {s.module or '(root)'} | {s.slot} | {s.operand} | {_shape(s.shape)} | "
                f"{_dtype(s.dtype)} | {s.groups} | "
                f"{_fmt_bytes(s.original_bytes)} → {_fmt_bytes(s.quantised_bytes)}"
                f"{f' (rebuilt: {s.rebuilt})' if s.rebuilt else ''} |"
            )
        counts = ", ".join(f"{k}: {v}" for k, v in sorted(self.counts().items()))
        lines += ["", f"compressed calls: {counts}"]
        ratio = self.quantised_bytes / max(self.original_bytes, 1)
        lines.append(
            f"compressed tensors: {_fmt_bytes(self.original_bytes)} → "
            f"{_fmt_bytes(self.quantised_bytes)} ({ratio:.1%})"
        )
        lines += ["", "Kept in full precision (per training step):", ""]
        if self.full_precision:
            lines.append("| module | op | shape | dtype | bytes | why |")
            lines.append("|---|---|---|---|---|---|")
            for r in sorted(self.full_precision, key=lambda r: -r.nbytes):
                lines.append(
                    f"| {r.module or '(root)'} | {r.op} | {_shape(r.shape)} | {_dtype(r.dtype)} "
                    f"| {_fmt_bytes(r.nbytes)} | {r.reason} |"
                )
        lines.append(f"full precision total: {_fmt_bytes(self.full_precision_bytes)}")
        if self.baseline_saved_bytes is not None and self.mesa_saved_bytes is not None:
            ratio = self.mesa_saved_bytes / max(self.baseline_saved_bytes, 1)
            lines.append(
                f"measured saved-for-backward activations: "
                f"{_fmt_bytes(self.baseline_saved_bytes)} → {_fmt_bytes(self.mesa_saved_bytes)} "
                f"({ratio:.1%}, expected saving {1 - ratio:.1%})"
            )
        return "\n".join(lines)


def _shape(shape: tuple[int, ...]) -> str:
    return "×".join(str(d) for d in shape) or "scalar"


def _dtype(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def summary(model: nn.Module, example_input: Tensor | None = None) -> MesaSummary:
    """What the converted ``model`` compresses, keeps, and the expected activation saving.

    Args:
        model: a converted model.
        example_input: optional input; when given, one training-mode forward with gradients is
            run with and without Mesa and the saved-for-backward bytes of both are measured
            (parameters and their autocast casts excluded, see :class:`SavedTensorMeter`);
            buffers, the Mesa estimates and forward counter and the training flag are restored
            afterwards.

    Returns:
        A :class:`MesaSummary`; ``str()`` of it is a readable table.
    """
    ctx = _context(model)
    baseline = mesa = None
    if example_input is not None:
        buffers = [(b, b.clone()) for b in model.buffers()]
        estimates = {k: (r.clone(), m.clone()) for k, (r, m) in ctx.estimates.items()}
        counter = ctx.counter.clone()
        was_training = model.training
        params = list(model.parameters())
        model.train()
        try:
            with torch.enable_grad():
                with mesa_disabled(model), SavedTensorMeter(params, activations_only=True) as mb:
                    model(example_input)
                with SavedTensorMeter(params, activations_only=True) as mm:
                    model(example_input)
        finally:
            model.train(was_training)
            with torch.no_grad():  # undo the probe's updates (norm statistics, Mesa estimates)
                for buf, saved in buffers:
                    buf.copy_(saved)
            ctx.estimates.clear()
            ctx.estimates.update(estimates)
            ctx.counter = counter
        baseline, mesa = mb.total_bytes, mm.total_bytes
    slots = sorted(ctx.records.values(), key=lambda s: (s.module, s.slot, s.operand))
    fp = sorted(ctx.fp_records.values(), key=lambda r: (r.module, r.op))
    return MesaSummary(ctx.policy, slots, fp, baseline, mesa)
