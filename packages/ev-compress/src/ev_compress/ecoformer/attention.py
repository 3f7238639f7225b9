"""``EcoAttention``: EcoFormer's binary-hash linear attention as a drop-in token mixer."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ev_compress.ecoformer.functional import FORMS, Form, eco_attention
from ev_compress.ecoformer.hashing import KernelizedHash
from ev_compress.ecoformer.packed import pack_codes, packed_eco_attention

__all__ = ["EcoAttention"]


class EcoAttention(nn.Module):
    """Shared-QK binary-hash linear attention, ``forward(x: [B, N, C]) → [B, N, C]``, O(N·b·d).

    ``qk = normalize(x W_qk)`` per head, ``v = x W_v``; the codes ``H = KSH(qk) ∈ {±1}^b``
    (:class:`~ev_compress.ecoformer.hashing.KernelizedHash`, sign with the clipped
    straight-through estimator) weight token ``j`` for query ``i`` by ``H_iᵀH_j + b + 1``
    (:func:`~ev_compress.ecoformer.functional.eco_attention`); then the output projection.

    The hash must be fitted once (:meth:`fit`, or :func:`ev_compress.ecoformer.fit_hash` for a
    whole model) before the first forward; its state is in buffers and travels with
    ``state_dict``.

    Args:
        dim: channels ``C``.
        num_heads: heads ``h`` (``C`` divisible by ``h``).
        bits: code bits per head ``b`` (paper 16).
        num_anchors: KSH anchors ``m`` (paper 25).
        topk: neighbours per token in the hash-fitting target (paper 10).
        form: ``"sum"`` (exact kernel sum) or ``"token"`` (official code, for its checkpoints).
        qkv_bias: bias on the ``qk`` and ``v`` projections.
        proj_drop: dropout after the output projection.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        bits: int = 16,
        num_anchors: int = 25,
        topk: int = 10,
        form: Form = "sum",
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        if num_heads <= 0 or dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        if form not in FORMS:
            raise ValueError(f"form must be one of {FORMS}, got {form!r}")
        if topk <= 0:
            raise ValueError(f"topk must be positive, got {topk}")
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.bits, self.topk, self.form = bits, topk, form
        self.qk = nn.Linear(dim, dim, bias=qkv_bias)
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.hash = KernelizedHash(num_heads, self.head_dim, bits, num_anchors)

    def _heads(self, t: Tensor) -> Tensor:
        B, N, _ = t.shape
        return t.reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)

    def shared_qk(self, x: Tensor) -> Tensor:
        """L2-normalised shared query/key per head: ``[B, N, C] → [B, h, N, d]``."""
        return F.normalize(self._heads(self.qk(x)), dim=-1)

    def codes(self, x: Tensor) -> Tensor:
        """Binary codes of the tokens: ``[B, N, C] → [B, h, N, b]`` in ``{−1, +1}``."""
        return self.hash(self.shared_qk(x))

    @torch.no_grad()
    def fit(
        self,
        x: Tensor,
        generator: torch.Generator | None = None,
        iterations: int | None = None,
    ) -> Tensor:
        """Fit the hash on tokens ``x: [B, N, C]`` (anchors from ``x[0]``); returns per-bit losses.

        See :meth:`KernelizedHash.fit` (``iterations`` overrides the SGD steps per bit).
        """
        return self.hash.fit(self.shared_qk(x), self.topk, generator, iterations)

    def forward(
        self,
        x: Tensor,
        H: int | Sequence[int] | None = None,
        W: int | None = None,
    ) -> Tensor:
        """Args:
            x: ``[B, N, C]``.
            H, W: map size, accepted for PVT/ev calling conventions (``attn(x, H, W)``,
                ``attn(x, (H, W))``, ``attn(x, feat_size)``) and checked against ``N``;
                the attention itself is global.

        Returns:
            ``[B, N, C]``.
        """
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"expected tokens [B, N, {self.dim}], got {tuple(x.shape)}")
        B, N, C = x.shape
        if H is not None:
            h_, w_ = (H[0], H[1]) if isinstance(H, Sequence) else (H, W)
            if w_ is not None and h_ * w_ not in (N, N - 1):  # N − 1: a class token (LIT-Ti)
                raise ValueError(f"got {N} tokens for a {h_}x{w_} map")
        out = eco_attention(self.codes(x), self._heads(self.v(x)), self.form)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, N, C)))

    @torch.no_grad()
    def forward_packed(self, x: Tensor) -> Tensor:
        """Inference through bit-packed codes and popcount affinities (equals :meth:`forward`).

        O(N²) in time (XOR/popcount per pair), no float code matrix; see
        :mod:`ev_compress.ecoformer.packed`.
        """
        B, N, C = x.shape
        packed = pack_codes(self.codes(x))
        out = packed_eco_attention(packed, self._heads(self.v(x)), self.bits, self.form)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, N, C)))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.num_heads}, bits={self.bits}, form={self.form!r}"
