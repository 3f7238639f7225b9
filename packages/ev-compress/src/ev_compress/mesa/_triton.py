"""Fused Triton quantise/dequantise kernels (CUDA only, optional).

One pass over the tensor each way: ``quantize`` reads ``x`` once, draws the stochastic-rounding
noise in registers (``tl.rand``, Philox) and writes uint8 codes; ``dequantize`` reads the codes
and writes ``x̂`` in the requested dtype. The per-group ``step``/``minimum`` vectors are computed
by :func:`ev_compress.mesa.quant.quantize` (torch reductions) and passed in. Disabled with
``EV_MESA_TRITON=0``; without Triton or CUDA the vectorised torch path of
:mod:`ev_compress.mesa.quant` is used.
"""

from __future__ import annotations

import functools
import itertools
import os
from typing import Any

import torch
from torch import Tensor

__all__ = ["available", "dequantize", "quantize"]

_BLOCK = 1024
_calls = itertools.count()


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
def _kernels() -> tuple[Any, Any]:
    import triton
    import triton.language as tl

    @triton.jit
    def quant_kernel(  # type: ignore[no-untyped-def]  # triton kernel
        x_ptr,
        out_ptr,
        step_ptr,
        min_ptr,
        n,
        rest,
        groups,
        levels,
        seed,
        STOCHASTIC: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        g = (offs // rest) % groups
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        step = tl.load(step_ptr + g, mask=mask, other=1.0)
        mn = tl.load(min_ptr + g, mask=mask, other=0.0)
        v = (x - mn) / step
        if STOCHASTIC:
            v = tl.floor(v + tl.rand(seed, offs.to(tl.int32)))
        else:
            v = tl.floor(v + 0.5)
        v = tl.minimum(tl.maximum(v, 0.0), levels)
        tl.store(out_ptr + offs, v.to(tl.uint8), mask=mask)

    @triton.jit
    def dequant_kernel(q_ptr, out_ptr, step_ptr, min_ptr, n, rest, groups, BLOCK: tl.constexpr):  # type: ignore[no-untyped-def]
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        g = (offs // rest) % groups
        q = tl.load(q_ptr + offs, mask=mask, other=0).to(tl.float32)
        step = tl.load(step_ptr + g, mask=mask, other=1.0)
        mn = tl.load(min_ptr + g, mask=mask, other=0.0)
        tl.store(out_ptr + offs, (q * step + mn).to(out_ptr.dtype.element_ty), mask=mask)

    return quant_kernel, dequant_kernel


def _seed(generator: torch.Generator | None) -> int:
    """A per-call Philox seed derived without a host sync from the generator's seed."""
    base = generator.initial_seed() if generator is not None else torch.initial_seed()
    return hash((base, next(_calls))) & 0x7FFFFFFF


def quantize(
    xg: Tensor,
    step: Tensor,
    minimum: Tensor,
    levels: float,
    stochastic: bool,
    generator: torch.Generator | None,
) -> Tensor:
    """Codes of a contiguous ``[pre, G, rest]`` tensor (see :func:`~ev_compress.mesa.quantize`)."""
    quant_kernel, _ = _kernels()
    out = torch.empty(xg.shape, dtype=torch.uint8, device=xg.device)
    n = xg.numel()
    if n:
        grid = ((n + _BLOCK - 1) // _BLOCK,)
        quant_kernel[grid](
            xg,
            out,
            step.contiguous(),
            minimum.contiguous(),
            n,
            xg.shape[2],
            xg.shape[1],
            levels,
            _seed(generator) if stochastic else 0,
            STOCHASTIC=stochastic,
            BLOCK=_BLOCK,
        )
    return out


def dequantize(data: Tensor, step: Tensor, minimum: Tensor, dtype: torch.dtype) -> Tensor:
    """``code · step + β`` of ``uint8 [pre, G, rest]`` codes, in ``dtype``."""
    _, dequant_kernel = _kernels()
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
