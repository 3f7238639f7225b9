"""Unbalanced entropic optimal transport in torch (batched, any device, log-domain stable).

:func:`sinkhorn_unbalanced` solves

.. math::
    \\gamma^* = \\arg\\min_\\gamma \\langle \\gamma, M \\rangle
        + \\varepsilon\\,\\mathrm{KL}(\\gamma \\,\\|\\, a b^\\top)
        + \\tau\\,\\mathrm{KL}(\\gamma 1 \\,\\|\\, a) + \\tau\\,\\mathrm{KL}(\\gamma^\\top 1 \\,\\|\\, b)

with the generalised Sinkhorn iterations ``u = (a / K v)^φ``, ``v = (b / Kᵀ u)^φ``,
``K = exp(−M/ε)·abᵀ``, ``φ = τ / (τ + ε)`` — the same problem, reference measure and
iterations as POT's ``ot.unbalanced.sinkhorn_unbalanced`` (``reg_type="kl"``), whose plan it
reproduces. ``stabilized=True`` runs them on log-potentials (log-sum-exp), so that small ``ε``
or large costs neither underflow nor overflow; ``False`` runs the plain scaling form.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["sinkhorn_unbalanced"]


def _check(a: Tensor, b: Tensor, M: Tensor, reg: float, reg_m: float) -> None:
    if M.dim() < 2:
        raise ValueError(f"M must be [..., n, m], got shape {tuple(M.shape)}")
    n, m = M.shape[-2:]
    if a.shape[-1] != n or b.shape[-1] != m:
        raise ValueError(
            f"a [..., {n}] and b [..., {m}] must match M [..., n, m]; got a {tuple(a.shape)}, "
            f"b {tuple(b.shape)}, M {tuple(M.shape)}"
        )
    if reg <= 0 or reg_m <= 0:
        raise ValueError(f"reg and reg_m must be > 0, got reg={reg}, reg_m={reg_m}")
    if (a < 0).any() or (b < 0).any():
        raise ValueError("a and b must be non-negative")


def sinkhorn_unbalanced(
    a: Tensor,
    b: Tensor,
    M: Tensor,
    reg: float,
    reg_m: float,
    num_iters: int = 1000,
    stabilized: bool = True,
    tol: float = 1e-6,
) -> Tensor:
    """The entropic unbalanced OT plan between histograms ``a`` and ``b`` for cost ``M``.

    Args:
        a: source masses, ``[..., n]`` (non-negative).
        b: target masses, ``[..., m]``.
        M: costs, ``[..., n, m]`` (leading dimensions broadcast: a batch of problems).
        reg: entropic regularisation ``ε`` > 0.
        reg_m: marginal relaxation ``τ`` > 0 (KL penalty on both marginals).
        num_iters: maximum number of Sinkhorn iterations.
        stabilized: iterate on log-potentials (recommended); ``False``: plain scaling.
        tol: stop when the relative change of the scalings (POT's criterion) is below it
            in every problem of the batch; ``0`` runs all ``num_iters``.

    Returns:
        The plan ``γ``, ``[..., n, m]``, in ``M``'s dtype.
    """
    _check(a, b, M, reg, reg_m)
    dtype = M.dtype
    a = a.to(dtype)
    b = b.to(dtype)
    phi = reg_m / (reg_m + reg)
    log_a = torch.log(a)
    log_b = torch.log(b)
    # log K = -M/ε + log a_i + log b_j   (reference measure a bᵀ, as POT's reg_type="kl")
    log_k = -M / reg + log_a.unsqueeze(-1) + log_b.unsqueeze(-2)
    batch = torch.broadcast_shapes(log_k.shape[:-2], a.shape[:-1], b.shape[:-1])
    log_k = log_k.expand(*batch, *log_k.shape[-2:])
    log_u = torch.zeros(*batch, M.shape[-2], dtype=dtype, device=M.device)
    log_v = torch.zeros(*batch, M.shape[-1], dtype=dtype, device=M.device)
    kernel = None if stabilized else torch.exp(log_k)
    for _ in range(num_iters):
        prev_u, prev_v = log_u, log_v
        if kernel is None:
            log_kv = torch.logsumexp(log_k + log_v.unsqueeze(-2), dim=-1)
            log_u = phi * (log_a - log_kv)
            log_ktu = torch.logsumexp(log_k + log_u.unsqueeze(-1), dim=-2)
            log_v = phi * (log_b - log_ktu)
        else:
            u = (a / (kernel @ torch.exp(log_v).unsqueeze(-1)).squeeze(-1)) ** phi
            log_u = torch.log(u)
            v = (b / (kernel.transpose(-1, -2) @ u.unsqueeze(-1)).squeeze(-1)) ** phi
            log_v = torch.log(v)
        if tol > 0:
            err = 0.5 * (_relative_change(log_u, prev_u) + _relative_change(log_v, prev_v))
            if bool((err < tol).all()):
                break
    return torch.exp(log_u.unsqueeze(-1) + log_k + log_v.unsqueeze(-2))


def _relative_change(log_new: Tensor, log_old: Tensor) -> Tensor:
    """POT's stopping quantity ``max|x − x'| / max(max|x|, max|x'|, 1)`` per problem."""
    new, old = torch.exp(log_new), torch.exp(log_old)
    scale = torch.maximum(new.abs().amax(-1), old.abs().amax(-1)).clamp_min(1.0)
    return (new - old).abs().amax(-1) / scale
