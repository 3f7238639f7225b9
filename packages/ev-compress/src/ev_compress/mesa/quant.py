"""Per-group uint8 quantisation with running range estimates and stochastic rounding.

A tensor is split into ``G`` groups along one *group dimension* (contiguous chunks of that
dimension), and every group gets an affine 8-bit code::

    step = α / levels                       # α: running range estimate of the group
    q    = clamp(floor((x − β) / step + u), 0, levels),  u ~ U(0, 1)   (stochastic rounding)

(on the torch path ``u`` takes the 256 values ``(k + ½)/256`` of one random byte, so rounding
is unbiased to within 1/512 of a step; the Triton and fused CPU kernels draw a float ``u``)
    x̂    = q · step + β                     # β: running minimum estimate of the group

``levels = 2**bits − 1`` (255 for 8 bits). Stochastic rounding makes ``x̂`` an unbiased estimate
of ``x`` for values inside ``[β, β + α]``; values outside are clamped at *both* ends (the
official Mesa code only clamps below, so values above the running maximum wrap around).

Running estimates (Mesa's "ema"): the first batch initialises ``α = max − min`` and ``β = min``
per group; afterwards ``α ← α − (1 − λ)(α − range_batch)`` and ``β ← β − (1 − λ)(β − min_batch)``
with momentum ``λ`` (0.9). Non-finite batch statistics (e.g. an fp16 overflow step) leave the
estimates unchanged. An estimate holding NaN is *uninitialised*: its next update initialises it
(how a converted model creates its estimates, so that the first step needs no separate code path,
also inside a compiled graph).

Layouts (which dimension is grouped):

* ``"channels"``: ``[..., C]`` tensors of rank ≤ 3 group their last dimension (tokens
  ``[B, N, C]``); rank ≥ 4 tensors group dimension 1 (conv maps ``[B, C, H, W]``). ``G`` is the
  largest divisor of the grouped size that is ≤ the requested group count.
* ``"heads"``: rank ≥ 4 tensors (``[B, h, N, d]`` attention operands and maps) group dimension
  1, one group per head by default (head-wise) or ``head_groups`` groups of heads; lower ranks
  fall back to ``"channels"``.
* ``"dim1"``: dimension 1 (batch-norm channels, any rank ≥ 2).

On CUDA with Triton available the quantise/dequantise element passes run as fused Triton
kernels (:mod:`ev_compress.mesa._triton`); on the CPU, calls seeded by a tensor (what a converted
model makes) run as one-pass kernels compiled by inductor (:mod:`ev_compress.mesa._fused`, with
their own noise, a function of the seed and the element's position) when a C++ compiler is available; elsewhere they are vectorised
torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from ev_compress.mesa import _fused

__all__ = [
    "GroupLayout",
    "Layout",
    "QTensor",
    "dequantize",
    "make_layout",
    "mix_seed",
    "mix_seed_int",
    "pack_bits",
    "quantize",
    "unpack_bits",
    "update_running_range",
]

Layout = Literal["channels", "heads", "dim1"]

_TINY = 1e-12


@dataclass(frozen=True)
class GroupLayout:
    """How a tensor of a given shape is grouped.

    Attributes:
        dim: the grouped dimension (non-negative).
        groups: number of contiguous groups ``G`` along ``dim``.
    """

    dim: int
    groups: int

    def view_shape(self, shape: torch.Size | tuple[int, ...]) -> tuple[int, int, int]:
        """``(pre, G, rest)``: the 3-D view a contiguous tensor of ``shape`` is quantised in."""
        return (
            math.prod(shape[: self.dim]),
            self.groups,
            math.prod(shape[self.dim :]) // self.groups,
        )


def _largest_divisor_at_most(n: int, limit: int) -> int:
    limit = max(1, min(n, limit))
    for g in range(limit, 0, -1):
        if n % g == 0:
            return g
    return 1


def make_layout(
    shape: torch.Size | tuple[int, ...],
    layout: Layout,
    *,
    channel_groups: int = 8,
    head_groups: int | None = None,
) -> GroupLayout:
    """The :class:`GroupLayout` of a tensor of ``shape`` under a layout rule.

    Args:
        shape: tensor shape (rank 0 is treated as ``[1]``).
        layout: ``"channels"``, ``"heads"`` or ``"dim1"`` (see the module docstring).
        channel_groups: requested group count of the channel layouts.
        head_groups: requested number of head groups (``None``: one group per head).
    """
    if channel_groups < 1 or (head_groups is not None and head_groups < 1):
        raise ValueError("group counts must be >= 1")
    rank = len(shape)
    if rank == 0:
        return GroupLayout(0, 1)
    if layout == "heads" and rank >= 4:
        heads = shape[1]
        wanted = heads if head_groups is None else head_groups
        return GroupLayout(1, _largest_divisor_at_most(heads, wanted))
    if layout == "dim1" and rank >= 2:
        return GroupLayout(1, _largest_divisor_at_most(shape[1], channel_groups))
    if layout not in ("channels", "heads", "dim1"):
        raise ValueError(f"unknown layout {layout!r}")
    dim = 1 if rank >= 4 else rank - 1
    return GroupLayout(dim, _largest_divisor_at_most(shape[dim], channel_groups))


@dataclass
class QTensor:
    """A quantised tensor: codes plus the per-group affine parameters used to make them.

    Attributes:
        data: ``uint8 [pre, G, rest]`` codes.
        step: ``float32 [G]`` quantisation step ``α / levels`` (a snapshot: later updates of
            the running estimates do not change it).
        minimum: ``float32 [G]`` offset ``β`` (snapshot).
        shape: the original shape.
        dtype: the original dtype.
    """

    data: Tensor
    step: Tensor
    minimum: Tensor
    shape: torch.Size
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        """Bytes held by the codes and the per-group parameters."""
        return sum(t.numel() * t.element_size() for t in (self.data, self.step, self.minimum))


def _as_groups(x: Tensor, layout: GroupLayout) -> Tensor:
    """``x`` viewed (or copied, when not viewable) as ``[pre, G, rest]``."""
    if x.dim() == 0:
        x = x.reshape(1)
    return x.reshape(layout.view_shape(x.shape))


def _batch_range(xg: Tensor, rows: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """Per-group ``(range, min)`` of a ``[pre, G, rest]`` tensor, in float32.

    One pass over each group: a whole-tensor ``aminmax`` (min and max together) per group is
    far faster on the CPU than reductions over chosen dimensions (measured 15-20× on
    ``[B·N, 8, C/8]``); with many groups the dimension reductions are used.
    """
    if xg.numel() == 0:
        empty = torch.zeros(xg.shape[1], dtype=torch.float32, device=xg.device)
        return empty, empty.clone()
    if _triton_ok(xg):
        from ev_compress.mesa import _triton

        mn, mx = _triton.group_minmax(xg.contiguous())
        return mx - mn, mn
    if _fused_ok(xg):
        mn, mx = _fused.group_minmax(xg, rows)
        return mx - mn, mn
    if rows is not None:
        raise AssertionError("row normalisation is folded into the fused kernels only")
    if xg.shape[1] <= 16:
        pairs = [torch.aminmax(xg[:, g]) for g in range(xg.shape[1])]
        mn = torch.stack([p[0] for p in pairs]).float()
        mx = torch.stack([p[1] for p in pairs]).float()
    else:
        mn = xg.amin(dim=(0, 2)).float()
        mx = xg.amax(dim=(0, 2)).float()
    return mx - mn, mn


def _noise_bytes(
    shape: torch.Size, device: torch.device, generator: torch.Generator | None
) -> Tensor:
    """Uniform random bytes of ``shape`` (one 32-bit draw gives four)."""
    n = math.prod(shape)
    words = torch.randint(
        -(2**31), 2**31 - 1, ((n + 3) // 4,), dtype=torch.int32, device=device, generator=generator
    )
    return words.view(torch.uint8)[:n].view(shape)


#: Odd 64-bit constants (splitmix64) mixing a step counter and a per-call salt into one seed.
_MIX_STEP = 0x9E3779B97F4A7C15
_MIX_SALT = 0xBF58476D1CE4E5B9
_MASK63 = (1 << 63) - 1


def _wrap64(v: int) -> int:
    """``v`` as a signed 64-bit integer (two's complement), what int64 tensor arithmetic keeps."""
    v &= (1 << 64) - 1
    return v - (1 << 64) if v >= 1 << 63 else v


def mix_seed(counter: Tensor, salt: int) -> Tensor:
    """The seed of one quantisation: ``(counter·A + salt·B) mod 2⁶³`` as an int64 tensor on
    ``counter``'s device (no host synchronisation; the same value on every device).

    Args:
        counter: int64 scalar tensor (a converted model's forward counter).
        salt: any integer (the call's position in the forward, mixed with the base seed).
    """
    mixed = counter.to(torch.int64) * _wrap64(_MIX_STEP) + _wrap64(salt * _MIX_SALT)
    return mixed & _MASK63


def mix_seed_int(counter: int, salt: int) -> int:
    """:func:`mix_seed` in Python integers (the same value)."""
    return (counter * _MIX_STEP + salt * _MIX_SALT) & _MASK63


@torch.no_grad()
def update_running_range(
    running_range: Tensor,
    running_min: Tensor,
    batch_range: Tensor,
    batch_min: Tensor,
    momentum: float,
) -> None:
    """In place: ``α ← α − (1 − λ)(α − range_batch)``, likewise ``β`` (skipping non-finite
    batch statistics); groups whose estimate is NaN (uninitialised) take the batch statistics
    (range 1, minimum 0 when those are not finite either).

    Args:
        running_range: ``[G]`` estimate ``α`` (updated in place).
        running_min: ``[G]`` estimate ``β`` (updated in place).
        batch_range: ``[G]`` range of the current batch.
        batch_min: ``[G]`` minimum of the current batch.
        momentum: ``λ`` in ``[0, 1]`` (0 = use the batch statistics only).
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum}")
    ok = torch.isfinite(batch_range) & torch.isfinite(batch_min)
    fresh = torch.isnan(running_range) | torch.isnan(running_min)
    rng, mn = running_range.float(), running_min.float()
    new_range = rng - (1.0 - momentum) * (rng - batch_range)
    new_min = mn - (1.0 - momentum) * (mn - batch_min)
    first_range = torch.where(ok, batch_range, torch.ones_like(batch_range))
    first_min = torch.where(ok, batch_min, torch.zeros_like(batch_min))
    running_range.copy_(torch.where(fresh, first_range, torch.where(ok, new_range, rng)))
    running_min.copy_(torch.where(fresh, first_min, torch.where(ok, new_min, mn)))


def _fused_ok(x: Tensor, dtype: torch.dtype | None = None) -> bool:
    """Whether the inductor-fused CPU kernels handle ``x`` (computing in ``dtype``, default
    ``x.dtype``), see :mod:`ev_compress.mesa._fused`."""
    return _fused.supports_dtype(dtype or x.dtype) and _fused.usable(x)


def _triton_ok(x: Tensor) -> bool:
    if x.device.type != "cuda":
        return False
    from ev_compress.mesa import _triton

    return _triton.available()


@torch.no_grad()
def quantize(
    x: Tensor,
    layout: GroupLayout,
    *,
    running_range: Tensor | None = None,
    running_min: Tensor | None = None,
    initialise: bool = False,
    update: bool = True,
    momentum: float = 0.9,
    bits: int = 8,
    stochastic: bool = True,
    generator: torch.Generator | None = None,
    seed: Tensor | None = None,
    normalize: tuple[Tensor, Tensor] | None = None,
) -> QTensor:
    """Quantise ``x`` per group into ``bits``-bit codes stored as uint8.

    Args:
        x: floating tensor of any shape.
        layout: grouping (see :func:`make_layout`).
        running_range: ``[G]`` running range estimate ``α``; ``None`` = use this batch's range.
            NaN entries are uninitialised: this batch's statistics set them (with ``update``).
        running_min: ``[G]`` running minimum estimate ``β``; ``None`` = use this batch's min.
        initialise: overwrite the running estimates with this batch's statistics (first step).
        update: apply the momentum update with this batch's statistics before quantising.
        momentum: ``λ`` of the running estimates.
        bits: code width, 1..8 (codes are stored one per byte).
        stochastic: stochastic rounding (``floor(v + u)``); ``False`` rounds to nearest
            (``floor(v + 0.5)``).
        generator: random generator for ``u`` (on ``x``'s device).
        seed: instead of ``generator``, an int64 scalar tensor (see :func:`mix_seed`): ``u``
            is then a function of ``(seed, x)`` alone (the CUDA kernel reads it on the device).
        normalize: ``(shift, scale)`` broadcastable to ``x``: quantise ``(x − shift)·scale``
            (computed in float32, or float64 for float64 ``x``; a layer norm's normalised input
            from its mean and rstd). With one value per row of the grouped view (``[..., 1]``
            statistics and the last dimension grouped) the fused CPU kernels compute it in
            registers, never writing the normalised tensor.

    Returns:
        The :class:`QTensor`; values outside ``[β, β + α]`` are clamped to the ends.
    """
    if not x.is_floating_point():
        raise TypeError(f"quantize expects a floating tensor, got {x.dtype}")
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    if (running_range is None) != (running_min is None):
        raise ValueError("pass both running_range and running_min, or neither")
    if generator is not None and seed is not None:
        raise ValueError("pass a generator or a seed, not both")
    levels = float(2**bits - 1)
    rows = None
    if normalize is not None:
        x, rows = _normalise(
            x, layout, normalize, fused=_fused_ok(x) and (seed is not None or not stochastic)
        )
    xg = _as_groups(x, layout)
    if running_range is None or running_min is None or initialise or update:
        batch_range, batch_min = _batch_range(xg, rows)
    if running_range is None or running_min is None:
        rng, mn = batch_range, batch_min
    else:
        if running_range.shape != (layout.groups,) or running_min.shape != (layout.groups,):
            raise ValueError(
                f"running estimates have shape {tuple(running_range.shape)}, layout needs "
                f"({layout.groups},)"
            )
        if initialise:
            running_range.fill_(math.nan)
        if initialise or update:
            update_running_range(running_range, running_min, batch_range, batch_min, momentum)
        rng, mn = running_range.float(), running_min.float()
    step = rng.clamp_min(_TINY) / levels
    minimum = mn.clone()
    inv = 1.0 / step
    off = -minimum * inv
    if _triton_ok(x):
        from ev_compress.mesa import _triton

        if stochastic and seed is None:
            seed = torch.randint(
                0, 2**31 - 1, (), dtype=torch.int64, device=x.device, generator=generator
            )
        data = _triton.quantize(xg.contiguous(), inv, off, levels, stochastic, seed)
    elif _fused_ok(x) and (seed is not None or not stochastic):
        data = _fused.quantize(xg, inv, off, levels, seed if stochastic else None, rows)
    else:  # (x − β)/step + u as one multiply-add, then clamp and truncate to uint8
        v = torch.addcmul(off[None, :, None], xg, inv[None, :, None])
        if stochastic:  # u = (byte + ½)/256: stochastic rounding at 1/256 resolution
            if seed is not None:
                generator = torch.Generator(device=x.device)
                generator.manual_seed(int(seed))
            v.add_(_noise_bytes(v.shape, v.device, generator), alpha=1.0 / 256).add_(0.5 / 256)
        else:
            v.add_(0.5)
        data = v.clamp_(0.0, levels).to(torch.uint8)  # v ≥ 0 here: truncation = floor
    dtype = x.dtype if rows is None else torch.promote_types(x.dtype, torch.float32)
    return QTensor(data=data, step=step, minimum=minimum, shape=x.shape, dtype=dtype)


def _normalise(
    x: Tensor, layout: GroupLayout, normalize: tuple[Tensor, Tensor], *, fused: bool
) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
    """``x`` and the per-row ``(shift, scale)`` (float32 ``[pre]``) the fused kernels apply, or
    ``(x − shift)·scale`` computed here and ``None``."""
    shift, scale = normalize
    sdt = torch.promote_types(x.dtype, torch.float32)
    per_row = (
        x.dim() >= 1
        and layout.dim == x.dim() - 1
        and all(t.shape == (*x.shape[:-1], 1) for t in (shift, scale))
    )
    if fused and per_row and sdt == torch.float32:
        return x, (shift.float().reshape(-1), scale.float().reshape(-1))
    return (x.to(sdt) - shift.to(sdt)).mul_(scale.to(sdt)), None


def dequantize(q: QTensor, dtype: torch.dtype | None = None) -> Tensor:
    """``x̂ = code · step + β`` reshaped to the original shape, in ``dtype`` (default: original)."""
    out_dtype = q.dtype if dtype is None else dtype
    if _triton_ok(q.data):
        from ev_compress.mesa import _triton

        return _triton.dequantize(q.data, q.step, q.minimum, out_dtype).reshape(q.shape)
    if _fused_ok(q.data, out_dtype):
        return _fused.dequantize(q.data, q.step, q.minimum, out_dtype).reshape(q.shape)
    x = q.data.to(torch.float32).mul_(q.step[None, :, None]).add_(q.minimum[None, :, None])
    return x.to(out_dtype).reshape(q.shape)


_BIT_WEIGHTS = (1, 2, 4, 8, 16, 32, 64, 128)


def pack_bits(mask: Tensor) -> Tensor:
    """Pack a boolean tensor into ``uint8 [ceil(numel / 8)]`` (bit ``i`` of byte ``j`` =
    element ``8j + i`` of the flattened mask)."""
    flat = mask.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=flat.device)
    return (flat.view(-1, 8) * weights).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: Tensor, shape: torch.Size | tuple[int, ...]) -> Tensor:
    """Inverse of :func:`pack_bits`: a ``bool`` tensor of ``shape``."""
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=packed.device)
    bits = (packed[:, None] & weights) != 0
    return bits.reshape(-1)[: math.prod(shape)].reshape(shape)
