"""Triton kernel of the packed EcoFormer attention (CUDA; also runs under ``TRITON_INTERPRET=1``).

One program per (image·head, block of ``BLOCK_M`` queries) walks the keys in blocks of
``BLOCK_N``: the affinities ``w = 2b + 1 − 2·popcount(p_i XOR p_j)`` come from the packed int32
words (SWAR popcount on uint32), then ``acc += w @ v_block`` and ``den += Σ_j w`` in fp32.
No float code matrix and no N×N tensor is stored.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["packed_attention_triton"]


@triton.jit
def _popcount(x):  # type: ignore[no-untyped-def]
    x = x - ((x >> 1) & 0x55555555)
    x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
    x = (x + (x >> 4)) & 0x0F0F0F0F
    return (x * 0x01010101) >> 24


@triton.jit
def _packed_kernel(  # type: ignore[no-untyped-def]
    P,
    V,
    Out,
    N,
    D,
    s_pb,
    s_pn,
    s_vb,
    s_vn,
    s_ob,
    s_on,
    BITS: tl.constexpr,
    WORDS: tl.constexpr,
    TOKEN: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    bh = tl.program_id(0)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < N
    mask_d = offs_d < D
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    den = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for start in range(0, N, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        ham = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.uint32)
        for w in tl.static_range(WORDS):
            pq = tl.load(P + bh * s_pb + offs_m * s_pn + w, mask=mask_m, other=0)
            pk = tl.load(P + bh * s_pb + offs_n * s_pn + w, mask=mask_n, other=0)
            x = pq.to(tl.uint32, bitcast=True)[:, None] ^ pk.to(tl.uint32, bitcast=True)[None, :]
            ham += _popcount(x)
        wgt = (2 * BITS + 1) - 2 * ham.to(tl.float32)
        wgt = tl.where(mask_n[None, :], wgt, 0.0)
        den += tl.sum(wgt, axis=1)
        if TOKEN:
            wgt = tl.where(mask_n[None, :], wgt - (BITS + 1), 0.0)
        v = tl.load(
            V + bh * s_vb + offs_n[:, None] * s_vn + offs_d[None, :],
            mask=mask_n[:, None] & mask_d[None, :],
            other=0.0,
        ).to(tl.float32)
        acc += tl.dot(wgt, v, input_precision="ieee")
    if TOKEN:
        vi = tl.load(
            V + bh * s_vb + offs_m[:, None] * s_vn + offs_d[None, :],
            mask=mask_m[:, None] & mask_d[None, :],
            other=0.0,
        ).to(tl.float32)
        acc += (BITS + 1) * vi
    out = acc / den[:, None]
    tl.store(
        Out + bh * s_ob + offs_m[:, None] * s_on + offs_d[None, :],
        out.to(Out.dtype.element_ty),
        mask=mask_m[:, None] & mask_d[None, :],
    )


def packed_attention_triton(packed: Tensor, v: Tensor, bits: int, form: str) -> Tensor:
    """Packed attention ``[B, h, N, W] int32 × [B, h, N, d] → [B, h, N, d]`` (see module doc)."""
    B, h, N, W = packed.shape
    d = v.shape[-1]
    p = packed.reshape(B * h, N, W).contiguous()
    vv = v.reshape(B * h, N, d).contiguous()
    out_dtype = (
        v.dtype if v.dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float32
    )
    out = torch.empty(B * h, N, d, device=v.device, dtype=out_dtype)
    block_d = max(16, triton.next_power_of_2(d))
    block_m, block_n = 32, 32
    grid = (B * h, triton.cdiv(N, block_m))
    _packed_kernel[grid](
        p,
        vv,
        out,
        N,
        d,
        p.stride(0),
        p.stride(1),
        vv.stride(0),
        vv.stride(1),
        out.stride(0),
        out.stride(1),
        BITS=bits,
        WORDS=W,
        TOKEN=form == "token",
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
    )
    return out.reshape(B, h, N, d).to(v.dtype)
