"""Bit-packed EcoFormer codes: 32 bits per int32 word, code products by popcount.

For codes ``H_i, H_j ∈ {±1}^b``: ``H_iᵀH_j = b − 2·popcount(p_i XOR p_j)`` where ``p`` are the
packed bits (bit ``k`` set ⇔ ``H_k = +1``). :func:`packed_eco_attention` evaluates the attention
of :func:`~ev_compress.ecoformer.functional.eco_attention` from packed codes with explicit
Hamming affinities, in query chunks: the code products are XOR + popcount only (a vectorised
SWAR popcount in torch on the CPU, a fused Triton kernel on CUDA). It is the inference path for
stored codes (no float code matrix is materialised); its cost is O(N²·(b/32 + d)), so the
linear-time float path stays the default for long sequences.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ev_compress.ecoformer.functional import FORMS, Form

__all__ = ["hamming_distance", "pack_codes", "packed_eco_attention", "popcount32", "unpack_codes"]

_CHUNK = 512  # query rows per chunk on the torch path


def pack_codes(codes: Tensor) -> Tensor:
    """Pack ±1 codes ``[..., b]`` into int32 words ``[..., ceil(b/32)]`` (bit k ⇔ ``codes[k] > 0``)."""
    b = codes.shape[-1]
    words = -(-b // 32)
    bits = (codes > 0).to(torch.int64)
    if words * 32 != b:
        bits = torch.nn.functional.pad(bits, (0, words * 32 - b))
    weights = torch.ones(32, dtype=torch.int64, device=codes.device).bitwise_left_shift_(
        torch.arange(32, device=codes.device)
    )
    packed = (bits.view(*bits.shape[:-1], words, 32) * weights).sum(-1)
    # two's complement: a set bit 31 makes a negative int32
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def unpack_codes(packed: Tensor, bits: int) -> Tensor:
    """Inverse of :func:`pack_codes`: int32 ``[..., W]`` → float ±1 ``[..., bits]``."""
    shifts = torch.arange(32, device=packed.device)
    flat = (packed.to(torch.int64).unsqueeze(-1) >> shifts) & 1
    flat = flat.flatten(-2)[..., :bits]
    return flat.to(torch.float32) * 2 - 1


def popcount32(x: Tensor) -> Tensor:
    """Set bits of each 32-bit word (int32 or int64 input; SWAR, no lookup tables)."""
    x = x.to(torch.int64) & 0xFFFFFFFF
    x = x - ((x >> 1) & 0x55555555)
    x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
    x = (x + (x >> 4)) & 0x0F0F0F0F
    return ((x * 0x01010101) & 0xFFFFFFFF) >> 24


def hamming_distance(p: Tensor, q: Tensor) -> Tensor:
    """All-pairs Hamming distances of packed codes ``[..., M, W]`` × ``[..., N, W]`` → ``[..., M, N]``."""
    return popcount32(p.unsqueeze(-2) ^ q.unsqueeze(-3)).sum(-1)


def _packed_attention_torch(packed: Tensor, v: Tensor, bits: int, form: Form) -> Tensor:
    N = packed.shape[-2]
    c = bits + 1
    acc = torch.promote_types(v.dtype, torch.float32)
    vf = v.to(acc)
    out = torch.empty_like(vf)
    for start in range(0, N, _CHUNK):
        stop = min(start + _CHUNK, N)
        w = (2 * bits + 1 - 2 * hamming_distance(packed[..., start:stop, :], packed)).to(acc)
        den = w.sum(-1, keepdim=True)
        if form == "sum":
            num = w @ vf
        else:
            num = (w - c) @ vf + c * vf[..., start:stop, :]
        out[..., start:stop, :] = num / den
    return out.to(v.dtype)


def packed_eco_attention(packed: Tensor, v: Tensor, bits: int, form: Form = "sum") -> Tensor:
    """EcoFormer attention from packed codes (popcount affinities).

    Args:
        packed: ``[B, h, N, W]`` int32 from :func:`pack_codes`.
        v: ``[B, h, N, d]``.
        bits: code length ``b`` (``W = ceil(b/32)``).
        form: ``"sum"`` or ``"token"`` (see :mod:`ev_compress.ecoformer.functional`).

    Returns:
        ``[B, h, N, d]`` in ``v``'s dtype, equal to ``eco_attention(unpack_codes(packed), v)``
        up to rounding. CUDA tensors use the Triton kernel (``torch`` path otherwise).
    """
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    if packed.dtype != torch.int32 or packed.shape[-1] != -(-bits // 32):
        raise ValueError(
            f"packed codes must be int32 [..., {-(-bits // 32)}] for {bits} bits, got "
            f"{packed.dtype} {tuple(packed.shape)}"
        )
    if packed.dim() != 4 or v.dim() != 4 or packed.shape[:3] != v.shape[:3]:
        raise ValueError(
            f"expected packed [B, h, N, W] and v [B, h, N, d], got {tuple(packed.shape)} and "
            f"{tuple(v.shape)}"
        )
    if v.is_cuda:
        try:
            from ev_compress.ecoformer._triton import packed_attention_triton
        except ImportError:  # no Triton: the torch path runs on CUDA too
            return _packed_attention_torch(packed, v, bits, form)
        return packed_attention_triton(packed, v, bits, form)
    return _packed_attention_torch(packed, v, bits, form)
