"""EcoFormer's binary-code linear attention, O(N·b·d).

With codes ``H ∈ {−1, +1}^{N×b}`` per head and ``c = b + 1``, the attention weight of token
``j`` for query ``i`` is the Hamming affinity ``w_ij = H_iᵀH_j + c = 2b + 1 − 2·ham(H_i, H_j)``,
which is always ≥ 1. Two forms (SYSTEMS.md §2.2):

* ``"sum"`` — the exact kernel sum ``out_i = Σ_j w_ij v_j / Σ_j w_ij``, computed linearly as
  ``[H_i·(Σ_j H_j v_jᵀ) + c·Σ_j v_j] / [H_i·Σ_j H_j + N·c]``.
* ``"token"`` — the official code's form, which adds ``c·v_i`` instead of ``c·Σ_j v_j`` while
  keeping the ``N·c`` of the sum in the normaliser (its weights do not sum to 1); released
  EcoFormer checkpoints were trained with it.

Every product with a code matrix goes through the custom op ``ev_compress::code_matmul``:
multiplying by ±1 is a sign flip, so :func:`ev_compress.energy.count_energy` counts these
products as additions (as the paper does). The normaliser (and the numerator it divides) is
computed in fp32 under autocast.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

__all__ = ["FORMS", "code_matmul", "eco_attention"]

FORMS = ("sum", "token")
Form = Literal["sum", "token"]


@torch.library.custom_op("ev_compress::code_matmul", mutates_args=())
def code_matmul(codes: Tensor, x: Tensor) -> Tensor:
    """``codes @ x`` where ``codes`` holds only ±1 (a binary-code product: additions only).

    Args:
        codes: ``[..., M, K]`` with entries in ``{−1, +1}`` (any float dtype).
        x: ``[..., K, N]`` with the same leading dimensions.

    Returns:
        ``[..., M, N]`` in ``x``'s dtype.
    """
    return torch.matmul(codes.to(x.dtype), x)


@code_matmul.register_fake
def _(codes: Tensor, x: Tensor) -> Tensor:
    return torch.matmul(codes.to(x.dtype), x)


def _setup_context(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
    codes, x = inputs
    ctx.save_for_backward(codes, x)
    ctx.codes_dtype = codes.dtype


def _backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:  # type: ignore[no-untyped-def]
    codes, x = ctx.saved_tensors
    g_codes = g_x = None
    if ctx.needs_input_grad[0]:
        g_codes = (grad @ x.transpose(-2, -1)).to(ctx.codes_dtype)
    if ctx.needs_input_grad[1]:
        g_x = code_matmul(codes.transpose(-2, -1), grad)
    return g_codes, g_x


code_matmul.register_autograd(_backward, setup_context=_setup_context)


def eco_attention(codes: Tensor, v: Tensor, form: Form = "sum") -> Tensor:
    """Hamming-affinity linear attention.

    Args:
        codes: ``[B, h, N, b]`` binary codes in ``{−1, +1}`` (the shared query/key hash).
        v: ``[B, h, N, d]`` values.
        form: ``"sum"`` (exact kernel sum) or ``"token"`` (the official code's ``c·v_i``).

    Returns:
        ``[B, h, N, d]`` in ``v``'s dtype (numerator and normaliser accumulated in fp32 when
        ``v`` is half precision).
    """
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    if codes.dim() != 4 or v.dim() != 4 or codes.shape[:3] != v.shape[:3]:
        raise ValueError(
            f"expected codes [B, h, N, b] and v [B, h, N, d], got {tuple(codes.shape)} and "
            f"{tuple(v.shape)}"
        )
    N, b = codes.shape[-2:]
    c = float(b + 1)
    acc = torch.promote_types(v.dtype, torch.float32)
    codes_t = codes.transpose(-2, -1)
    context = code_matmul(codes_t, v)  # [B, h, b, d] = Σ_j H_j v_jᵀ, in v's dtype like the paper
    with torch.autocast(v.device.type, enabled=False):
        codes_f = codes.to(acc)
        num = code_matmul(codes_f, context.to(acc))  # [B, h, N, d]
        bias = c * (v.to(acc).sum(dim=-2, keepdim=True) if form == "sum" else v.to(acc))
        code_sum = codes_f.sum(dim=-2).unsqueeze(-1)  # [B, h, b, 1]
        den = code_matmul(codes_f, code_sum) + N * c  # [B, h, N, 1], ≥ N
        if torch.is_grad_enabled() and (codes.requires_grad or v.requires_grad):
            return ((num + bias) / den).to(v.dtype)
        # inference: reuse num's buffer (fresh N×d temporaries dominate the time at ≥16k tokens)
        return num.add_(bias).div_(den).to(v.dtype)
