"""Fused Triton kernels for Mesa's quantisation (CUDA only, optional).

* ``group_minmax``: one pass over ``[pre, G, rest]`` writing per-block partial minima and
  maxima of each group (the few partials are reduced by torch).
* ``quantize``: one pass reading ``x`` and writing uint8 codes: ``x·inv + off`` (the per-group
  reciprocal step and offset, computed once by torch exactly as the torch path does, so both
  paths compute the same product-sum), stochastic-rounding noise drawn in registers
  (``tl.rand``, Philox), clamp, truncate.
* ``dequantize``: codes → ``code·step + β`` in the requested dtype.

Offsets are 64-bit (tensors above 2³¹ elements); the Philox seed is read from a device tensor
(Mesa's per-call seed) (no host synchronisation, CUDA-graph safe), and the Philox offset
of element ``i`` is ``i mod 2³¹`` with ``i div 2³¹`` mixed into the seed. Disabled with
``EV_MESA_TRITON=0``; without Triton or CUDA the vectorised torch path of
:mod:`ev_compress.mesa.quant` is used. ``TRITON_INTERPRET=1`` runs them on CPU tensors (tests).
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch
from torch import Tensor

__all__ = ["available", "dequantize", "group_minmax", "quantize"]

_BLOCK = 1024


@functools.cache
def available() -> bool:
    """Whether the Triton kernels can be used (Triton importable, CUDA present, not disabled)."""
    if os.environ.get("EV_MESA_TRITON", "1").strip().lower() in {"0", "false", "no"}:
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


@functools.cache
def _kernels() -> tuple[Any, Any, Any]:
    import triton
    import triton.language as tl

    @triton.jit
    def minmax_kernel(  # type: ignore[no-untyped-def]  # triton kernel
        x_ptr, min_ptr, max_ptr, groups, rest, chunks, BLOCK: tl.constexpr
    ):
        # program (p, g, c): elements [c·BLOCK, (c+1)·BLOCK) of group g in row p
        p = tl.program_id(0).to(tl.int64)
        g = tl.program_id(1).to(tl.int64)
        c = tl.program_id(2).to(tl.int64)
        cols = c * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
        mask = cols < rest
        base = (p * groups + g) * rest
        x = tl.load(x_ptr + base + cols, mask=mask, other=0.0).to(tl.float32)
        mn = tl.min(tl.where(mask, x, float("inf")), axis=0)
        mx = tl.max(tl.where(mask, x, float("-inf")), axis=0)
        out = g * (tl.num_programs(0).to(tl.int64) * chunks) + p * chunks + c
        tl.store(min_ptr + out, mn)
        tl.store(max_ptr + out, mx)

    @triton.jit
    def quant_kernel(  # type: ignore[no-untyped-def]  # triton kernel
        x_ptr,
        out_ptr,
        inv_ptr,
        off_ptr,
        seed_ptr,
        n,
        rest,
        groups,
        levels,
        STOCHASTIC: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
        mask = offs < n
        g = (offs // rest) % groups
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        inv = tl.load(inv_ptr + g, mask=mask, other=1.0)
        off = tl.load(off_ptr + g, mask=mask, other=0.0)
        v = x * inv + off
        if STOCHASTIC:
            seed = tl.load(seed_ptr).to(tl.int32)
            high = (offs >> 31).to(tl.int32)
            low = (offs & 0x7FFFFFFF).to(tl.int32)
            v = v + tl.rand(seed ^ (high * 40503), low)
        else:
            v = v + 0.5
        v = tl.minimum(tl.maximum(v, 0.0), levels)
        tl.store(out_ptr + offs, v.to(tl.uint8), mask=mask)

    @triton.jit
    def dequant_kernel(  # type: ignore[no-untyped-def]  # triton kernel
        q_ptr, out_ptr, step_ptr, min_ptr, n, rest, groups, BLOCK: tl.constexpr
    ):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
        mask = offs < n
        g = (offs // rest) % groups
        q = tl.load(q_ptr + offs, mask=mask, other=0).to(tl.float32)
        step = tl.load(step_ptr + g, mask=mask, other=1.0)
        mn = tl.load(min_ptr + g, mask=mask, other=0.0)
        tl.store(out_ptr + offs, (q * step + mn).to(out_ptr.dtype.element_ty), mask=mask)

    return minmax_kernel, quant_kernel, dequant_kernel


def group_minmax(xg: Tensor) -> tuple[Tensor, Tensor]:
    """Per-group ``(min, max)`` (float32 ``[G]``) of a contiguous ``[pre, G, rest]`` tensor."""
    minmax_kernel, _, _ = _kernels()
    pre, groups, rest = xg.shape
    block = min(_BLOCK, max(16, 1 << (max(rest, 1) - 1).bit_length()))
    chunks = (rest + block - 1) // block
    mins = torch.empty(groups, pre * chunks, dtype=torch.float32, device=xg.device)
    maxs = torch.empty_like(mins)
    minmax_kernel[(pre, groups, chunks)](xg, mins, maxs, groups, rest, chunks, BLOCK=block)
    return mins.amin(dim=1), maxs.amax(dim=1)


def quantize(
    xg: Tensor,
    inv: Tensor,
    off: Tensor,
    levels: float,
    stochastic: bool,
    seed: Tensor | None,
) -> Tensor:
    """Codes of a contiguous ``[pre, G, rest]`` tensor: ``clamp(x·inv + off + u, 0, levels)``;
    ``seed``: int64 scalar tensor (read on the device) of the Philox stream of ``u``."""
    _, quant_kernel, _ = _kernels()
    out = torch.empty(xg.shape, dtype=torch.uint8, device=xg.device)
    n = xg.numel()
    if n:
        # the seed stays on the device: no host sync, capturable in a CUDA graph
        if seed is None:
            seed = torch.zeros((), dtype=torch.int64, device=xg.device)
        seed = seed.to(device=xg.device, dtype=torch.int64).reshape(1)
        grid = ((n + _BLOCK - 1) // _BLOCK,)
        quant_kernel[grid](
            xg,
            out,
            inv.contiguous(),
            off.contiguous(),
            seed,
            n,
            xg.shape[2],
            xg.shape[1],
            levels,
            STOCHASTIC=stochastic,
            BLOCK=_BLOCK,
        )
    return out


def dequantize(data: Tensor, step: Tensor, minimum: Tensor, dtype: torch.dtype) -> Tensor:
    """``code · step + β`` of ``uint8 [pre, G, rest]`` codes, in ``dtype``."""
    _, _, dequant_kernel = _kernels()
    out = torch.empty(data.shape, dtype=dtype, device=data.device)
    n = data.numel()
    if n:
        grid = ((n + _BLOCK - 1) // _BLOCK,)
        dequant_kernel[grid](
            data,
            out,
            step.contiguous(),
            minimum.contiguous(),
            n,
            data.shape[2],
            data.shape[1],
            BLOCK=_BLOCK,
        )
    return out
