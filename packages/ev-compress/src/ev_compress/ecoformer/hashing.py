"""Kernelised supervised hashing (KSH) of EcoFormer's shared query/key vectors.

A token ``x`` (one head's L2-normalised ``qk`` vector, ``d`` channels) is hashed to ``b`` bits::

    φ(x)_r = exp(−‖x − a_r‖² / (2σ)) − μ_r        r = 1..m anchors
    h(x)   = sign(A φ(x)) ∈ {−1, +1}^b              A: [heads, b, m]

with σ the mean squared token–anchor distance of the input being hashed (per image and head),
the anchors ``a_r`` drawn from the fitting batch and ``μ`` that batch's mean kernel feature.

``A`` is learnt by :meth:`KernelizedHash.fit`, bit by bit (EcoFormer, NeurIPS'22, §3.2): the
target ``S`` is ``+b`` at every token's top-k most similar tokens (by ``qk·qkᵀ``), ``−b`` at its
bottom-k and 0 elsewhere; bit ``r`` minimises ``−yᵀ S_r y / (N b)`` with the sign relaxed to
``2·sigmoid(z) − 1``, by Nesterov SGD, and is kept only if its *binarised* loss beats the
bit it replaces; then ``S_{r+1} = S_r − y yᵀ``. Fitting is an explicit call, never a side effect
of ``forward``. ``yᵀ S_r y`` is evaluated without forming ``S``: the sparse top/bottom-k part by
gathering, the ``−Σ y_s y_sᵀ`` part as ``−Σ_s (y_sᵀ y)²``, so fitting costs O(N·(k + b)) per
step instead of the O(N²) of a dense ``S``; only the top-k search touches N² similarities, in
row chunks.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ev_core.errors import EvError

__all__ = ["HashNotFittedError", "KernelizedHash", "sign_ste", "similarity_targets"]

_TOPK_CHUNK = 256  # query rows per chunk of the top-k search (bounds the N×N similarity block)


class HashNotFittedError(EvError):
    """An EcoFormer hash was used before :meth:`KernelizedHash.fit` (or loading fitted weights)."""


class _SignSTE(torch.autograd.Function):
    """``sign`` forward (0 ↦ +1, so codes are exactly ±1); gradient passed where ``|z| < 1``."""

    @staticmethod
    def forward(ctx: Any, z: Tensor) -> Tensor:
        ctx.save_for_backward(z)
        one = torch.ones((), dtype=z.dtype, device=z.device)
        return torch.where(z >= 0, one, -one)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        (z,) = ctx.saved_tensors
        return grad * (z.abs() < 1).to(grad.dtype)


def sign_ste(z: Tensor) -> Tensor:
    """Binarise to ``{−1, +1}`` with the clipped straight-through estimator.

    Args:
        z: any shape, floating point.

    Returns:
        ``±1`` of ``z``'s shape and dtype; backward passes ``grad·1[|z| < 1]``.
    """
    return _SignSTE.apply(z)


def similarity_targets(qk: Tensor, topk: int) -> tuple[Tensor, Tensor]:
    """Indices of every token's ``topk`` most and least similar tokens (inner product).

    Args:
        qk: ``[B, h, N, d]``.
        topk: ``k`` (``2k ≤ N``).

    Returns:
        ``(top, bottom)``, each ``[B, h, N, k]`` int64 (a token's own index is among its top-k
        when it is its most similar token, as in the official code).
    """
    N = qk.shape[-2]
    if not (topk > 0 and 2 * topk <= N):
        raise ValueError(f"topk={topk} needs 0 < 2·topk ≤ N={N} tokens")
    tops, bottoms = [], []
    for start in range(0, N, _TOPK_CHUNK):
        sim = qk[..., start : start + _TOPK_CHUNK, :] @ qk.transpose(-2, -1)
        tops.append(sim.topk(topk, dim=-1).indices)
        bottoms.append(sim.topk(topk, dim=-1, largest=False).indices)
    return torch.cat(tops, dim=-2), torch.cat(bottoms, dim=-2)


class KernelizedHash(nn.Module):
    """Per-head kernelised hash ``[B, h, N, d] → {±1}^[B, h, N, b]`` (see the module doc).

    State (buffers, saved with the model): ``projection`` A ``[h, b, m]`` (random normal until
    fitted), ``anchors`` ``[h, m, d]``, ``kernel_mean`` μ ``[h, m]``, ``fitted`` (bool scalar).

    Args:
        num_heads: heads ``h``.
        head_dim: channels per head ``d``.
        bits: code length ``b``.
        num_anchors: anchors ``m``.
        lr: SGD learning rate of :meth:`fit` (official 5e-4).
        momentum: Nesterov momentum of :meth:`fit` (official 0.9).
        iterations: SGD steps per bit (official 100).
    """

    projection: Tensor
    anchors: Tensor
    kernel_mean: Tensor
    fitted: Tensor

    def __init__(
        self,
        num_heads: int,
        head_dim: int,
        bits: int = 16,
        num_anchors: int = 25,
        lr: float = 5e-4,
        momentum: float = 0.9,
        iterations: int = 100,
    ) -> None:
        super().__init__()
        for name, value in (
            ("num_heads", num_heads),
            ("head_dim", head_dim),
            ("bits", bits),
            ("num_anchors", num_anchors),
        ):
            if value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        self.num_heads, self.head_dim, self.bits, self.num_anchors = (
            num_heads,
            head_dim,
            bits,
            num_anchors,
        )
        self.lr, self.momentum, self.iterations = lr, momentum, iterations
        self.register_buffer("projection", torch.randn(num_heads, bits, num_anchors))
        self.register_buffer("anchors", torch.zeros(num_heads, num_anchors, head_dim))
        self.register_buffer("kernel_mean", torch.zeros(num_heads, num_anchors))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))
        self._is_fitted = False  # Python mirror of ``fitted``: no tensor read in forward

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args)
        self._is_fitted = bool(self.fitted)

    @property
    def is_fitted(self) -> bool:
        """Whether anchors, mean and projection come from :meth:`fit` or a fitted checkpoint."""
        return self._is_fitted

    def kernel_features(self, x: Tensor) -> Tensor:
        """Centred RBF features ``φ(x)``: ``[B, h, N, d] → [B, h, N, m]`` (fp32)."""
        x = x.float()
        anchors = self.anchors.float()
        # ‖x − a‖² = ‖x‖² + ‖a‖² − 2·x·a: one matmul instead of an [N, m, d] difference tensor
        sq = (
            x.pow(2).sum(-1, keepdim=True)
            + anchors.pow(2).sum(-1).unsqueeze(-2)
            - 2.0 * (x @ anchors.transpose(-2, -1))
        ).clamp_min(0.0)
        sigma = sq.mean(dim=(-2, -1), keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        return torch.exp(sq / (-2.0 * sigma)) - self.kernel_mean.float().unsqueeze(-2)

    def forward(self, x: Tensor) -> Tensor:
        """Hash ``x: [B, h, N, d]`` to codes ``[B, h, N, b]`` in ``{−1, +1}`` (fp32).

        Raises:
            HashNotFittedError: before :meth:`fit` (or loading a fitted state).
        """
        if not self._is_fitted:
            raise HashNotFittedError(
                "EcoFormer hash is not fitted: call ev_compress.ecoformer.fit_hash(model, batches) "
                "(or EcoAttention.fit / KernelizedHash.fit), or load a fitted checkpoint"
            )
        if x.dim() != 4 or x.shape[1] != self.num_heads or x.shape[-1] != self.head_dim:
            raise ValueError(
                f"expected [B, {self.num_heads}, N, {self.head_dim}], got {tuple(x.shape)}"
            )
        with torch.autocast(x.device.type, enabled=False):
            z = torch.einsum("bhnm,hkm->bhnk", self.kernel_features(x), self.projection.float())
            return sign_ste(z)

    @torch.no_grad()
    def fit(
        self,
        x: Tensor,
        topk: int = 10,
        generator: torch.Generator | None = None,
        iterations: int | None = None,
    ) -> Tensor:
        """Learn anchors, kernel mean and projection from tokens ``x`` (the official recipe).

        Args:
            x: ``[B, h, N, d]`` L2-normalised shared query/key vectors (detached).
            topk: similar/dissimilar neighbours per token in the target (official 10).
            generator: RNG for the anchor choice (``m`` tokens of the first image).
            iterations: SGD steps per bit for this fit (default: the constructor's); 0 keeps the
                random projection (anchors and mean are still fitted).

        Returns:
            Per-bit binarised losses ``[b, h]`` after fitting (lower = codes agree more with the
            top-k/bottom-k relations).
        """
        if x.dim() != 4 or x.shape[1] != self.num_heads or x.shape[-1] != self.head_dim:
            raise ValueError(
                f"expected [B, {self.num_heads}, N, {self.head_dim}], got {tuple(x.shape)}"
            )
        N = x.shape[2]
        if self.num_anchors > N:
            raise ValueError(
                f"fitting needs at least num_anchors={self.num_anchors} tokens, got {N}"
            )
        x = x.detach().float()
        perm = torch.randperm(N, generator=generator)[: self.num_anchors].to(x.device)
        self.anchors.copy_(x[0, :, perm])
        self.kernel_mean.zero_()
        feats = self.kernel_features(x)  # uncentred: kernel_mean is zero here
        self.kernel_mean.copy_(feats.mean(dim=(0, 2)))
        feats = feats - self.kernel_mean.unsqueeze(-2)
        top, bottom = similarity_targets(x, topk)
        steps = self.iterations if iterations is None else iterations
        losses = self._fit_projection(feats, top, bottom, steps)
        self.fitted.fill_(True)
        self._is_fitted = True
        return losses

    def _objective(self, y: Tensor, top: Tensor, bottom: Tensor, prev: Tensor) -> Tensor:
        """Per-head ``−yᵀ S y / (N b)`` averaged over images: ``y [B,h,N]`` → ``[h]``.

        ``S = b·S0 − Σ_s y_s y_sᵀ`` with ``S0`` the ±1 top/bottom-k indicator; ``prev`` holds
        the chosen earlier bits ``[B, h, N, r]``.
        """
        N = y.shape[-1]
        y_top = y.gather(-1, top.flatten(-2)).view_as(top).sum(-1)
        y_bot = y.gather(-1, bottom.flatten(-2)).view_as(bottom).sum(-1)
        quad = self.bits * (y * (y_top - y_bot)).sum(-1)
        if prev.shape[-1]:
            quad = quad - torch.einsum("bhnr,bhn->bhr", prev, y).pow(2).sum(-1)
        return (-quad / (N * self.bits)).mean(0)

    def _fit_projection(self, feats: Tensor, top: Tensor, bottom: Tensor, steps: int) -> Tensor:
        """Bit-by-bit Nesterov-SGD fit of ``projection`` on centred features ``[B, h, N, m]``."""
        B, h, N, _ = feats.shape
        prev = feats.new_zeros(B, h, N, 0)
        losses = []
        for r in range(self.bits):
            a_old = self.projection[:, r, :].float().clone()
            a = a_old.clone().requires_grad_(True)
            opt = torch.optim.SGD([a], lr=self.lr, momentum=self.momentum, nesterov=True)
            with torch.enable_grad():
                for _ in range(steps):
                    # 2·sigmoid(z) − 1 = tanh(z / 2): the relaxed sign
                    y = torch.tanh(0.5 * torch.einsum("bhnm,hm->bhn", feats, a))
                    loss = self._objective(y, top, bottom, prev).mean()
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
            a = a.detach()
            y_old = torch.where(torch.einsum("bhnm,hm->bhn", feats, a_old) >= 0, 1.0, -1.0)
            y_new = torch.where(torch.einsum("bhnm,hm->bhn", feats, a) >= 0, 1.0, -1.0)
            loss_old = self._objective(y_old, top, bottom, prev)
            loss_new = self._objective(y_new, top, bottom, prev)
            better = (loss_new < loss_old) & torch.isfinite(a).all(-1)  # decided per head
            self.projection[:, r, :] = torch.where(better[:, None], a, a_old).to(self.projection)
            y = torch.where(better[None, :, None], y_new, y_old)
            prev = torch.cat((prev, y.unsqueeze(-1)), dim=-1)
            losses.append(torch.where(better, loss_new, loss_old))
        return torch.stack(losses)

    def extra_repr(self) -> str:
        return (
            f"heads={self.num_heads}, head_dim={self.head_dim}, bits={self.bits}, "
            f"anchors={self.num_anchors}, fitted={self._is_fitted}"
        )
