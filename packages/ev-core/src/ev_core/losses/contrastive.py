"""Contrastive losses: InfoNCE (NT-Xent), MACL and supervised contrastive (SupCon).

Every loss works on L2-normalised embeddings (cosine similarities) and is computed in float32
(float64 inputs stay float64) with autocast disabled, through ``log_softmax``.

Arrangements of :func:`info_nce_loss` / :func:`macl_loss` for two batches ``z1, z2: [B, D]``
(two views of the same ``B`` samples):

* ``"simclr"`` (default): SimCLR's symmetric arrangement. The ``2B`` embeddings are all
  anchors; anchor ``z1[i]`` has ``z2[i]`` as its positive and vice versa, and the other
  ``2B − 2`` embeddings, plus every row of the optional ``negatives`` bank, as negatives.
* ``"moco"``: query/key (MoCo). ``z1`` are the ``B`` queries (anchors) and ``z2`` their keys
  (usually momentum-encoder outputs, detached by the caller): query ``i`` has key ``i`` as its
  positive and the keys of the other ``B − 1`` samples (MoCo v3's in-batch keys) plus every
  row of the ``negatives`` bank (MoCo v2's queue) as negatives. Symmetrise by averaging the
  calls ``(q1, k2)`` and ``(q2, k1)``: one call on concatenated views would count a sample's
  own key of the query's view as a negative.

With ``gather_distributed=True`` (DDP, ``torchrun``) each rank passes its local batch; in the
SimCLR arrangement the embeddings (in the MoCo arrangement the keys) of every rank become
candidates through :func:`ev_core.distributed.all_gather_with_grad` (gradients flow back to the
rank that produced them) while the anchors stay local, and statistics such as MACL's alignment ``A`` are averaged
over all ranks. The mean of the per-rank losses then equals the loss of the concatenated global
batch, and DDP's gradient averaging gives exactly the single-process gradients.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from ev_core.distributed import all_gather_with_grad, get_rank, get_world_size

__all__ = [
    "ContrastiveOutput",
    "InfoNCELoss",
    "MACLLoss",
    "SupConLoss",
    "info_nce_loss",
    "macl_loss",
    "macl_temperature",
    "supcon_loss",
]

Arrangement = Literal["simclr", "moco"]
Reduction = Literal["mean", "none"]
_ARRANGEMENTS = ("simclr", "moco")
_REDUCTIONS = ("mean", "none")
_V_EPS = 1e-8  # MACL: V = 1 / (1 - P + eps)
_TAU_FLOOR = 1e-3  # MACL: τ is floored at this fraction of τ0 (only reached when α(1+A0) ≥ 1)


@dataclass(frozen=True)
class ContrastiveOutput:
    """A contrastive loss and the statistics it was computed with (all detached but ``loss``).

    Attributes:
        loss: the loss, a scalar (``reduction="mean"``) or ``[N]`` per anchor (``"none"``).
        temperature: ``0-d`` temperature actually used (MACL's adaptive τ).
        alignment: ``0-d`` mean cosine between positive pairs (MACL's ``A``; over all ranks
            when gathered).
        accuracy: ``0-d`` fraction of (local) anchors whose positive is the most similar
            candidate.
        num_negatives: negatives per anchor.
    """

    loss: Tensor
    temperature: Tensor
    alignment: Tensor
    accuracy: Tensor
    num_negatives: int

    def logs(self, prefix: str = "") -> dict[str, float]:
        """The statistics as Python floats for training logs (synchronises a CUDA device)."""
        loss = self.loss.detach()
        return {
            f"{prefix}loss": float(loss.mean()),
            f"{prefix}temperature": float(self.temperature),
            f"{prefix}alignment": float(self.alignment),
            f"{prefix}accuracy": float(self.accuracy),
        }


# ----------------------------------------------------------------------------------------
# shared machinery
# ----------------------------------------------------------------------------------------
def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _check_pair(z1: Tensor, z2: Tensor, negatives: Tensor | None) -> None:
    if z1.ndim != 2 or z2.ndim != 2:
        raise ValueError(
            f"z1 and z2 must be [B, D] embeddings, got {tuple(z1.shape)} and {tuple(z2.shape)}"
        )
    if z1.shape != z2.shape:
        raise ValueError(
            f"z1 and z2 must have the same shape, got {tuple(z1.shape)} and {tuple(z2.shape)}"
        )
    if z1.shape[0] == 0:
        raise ValueError("empty batch: z1 and z2 have no rows")
    if not (z1.is_floating_point() and z2.is_floating_point()):
        raise TypeError(f"embeddings must be floating point, got {z1.dtype} and {z2.dtype}")
    if negatives is not None and (negatives.ndim != 2 or negatives.shape[1] != z1.shape[1]):
        raise ValueError(f"negatives must be [K, D={z1.shape[1]}], got {tuple(negatives.shape)}")


def _all_reduce_mean(value: Tensor, count: int) -> Tensor:
    """Mean over all ranks of a local mean ``value`` computed over ``count`` items (detached)."""
    if get_world_size() == 1:
        return value
    buf = torch.stack([value.detach() * count, value.new_tensor(float(count))])
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    return buf[0] / buf[1]


def _positive_and_negatives(
    z1: Tensor,
    z2: Tensor,
    negatives: Tensor | None,
    arrangement: str,
    gather_distributed: bool,
) -> tuple[Tensor, Tensor]:
    """Cosine similarities of each anchor with its positive and with its negatives.

    Returns:
        ``(pos [N], neg [N, M])`` in the compute dtype, ``N = 2B`` (SimCLR) or ``B`` (MoCo).
    """
    if arrangement not in _ARRANGEMENTS:
        raise ValueError(f"arrangement must be one of {_ARRANGEMENTS}, got {arrangement!r}")
    _check_pair(z1, z2, negatives)
    dtype = _compute_dtype(z1)
    q = F.normalize(z1.to(dtype), dim=1)
    k = F.normalize(z2.to(dtype), dim=1)
    bank = F.normalize(negatives.to(dtype), dim=1) if negatives is not None else None
    b = q.shape[0]

    world, rank = (get_world_size(), get_rank()) if gather_distributed else (1, 0)
    if world > 1:
        gathered = [all_gather_with_grad(t) for t in ((k,) if arrangement == "moco" else (q, k))]
        if gathered[0].shape[0] != world * b:
            raise RuntimeError("every rank must pass the same batch size when gathering")
    else:
        gathered = [k] if arrangement == "moco" else [q, k]
    n_global = world * b
    local = torch.arange(b, device=q.device) + rank * b
    if arrangement == "moco":  # B queries against the keys of every sample (all ranks)
        anchors, candidates = q, gathered[0]  # [B, D], [W·B, D]
        self_idx, pos_idx = None, local
    else:  # 2B anchors against both views of every sample (all ranks)
        anchors = torch.cat([q, k], dim=0)  # [2B, D]
        candidates = torch.cat(gathered, dim=0)  # [2·W·B, D]
        self_idx = torch.cat([local, local + n_global])
        pos_idx = torch.cat([local + n_global, local])
    sim = anchors @ candidates.T
    rows = torch.arange(anchors.shape[0], device=q.device)
    pos = sim[rows, pos_idx]
    keep = torch.ones_like(sim, dtype=torch.bool)
    keep[rows, pos_idx] = False
    if self_idx is not None:
        keep[rows, self_idx] = False
    neg = sim[keep].view(anchors.shape[0], -1)
    if bank is not None and bank.shape[0] > 0:
        neg = torch.cat([neg, anchors @ bank.T], dim=1)
    return pos, neg


def _finish(
    pos: Tensor,
    neg: Tensor,
    temperature: Tensor,
    alignment: Tensor,
    reweight: bool,
    reduction: str,
    gather_distributed: bool,
) -> ContrastiveOutput:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if neg.shape[1] == 0:
        raise ValueError("no negatives: use a batch of at least 2 samples or pass a negatives bank")
    logits = torch.cat([pos[:, None], neg], dim=1) / temperature
    log_p = F.log_softmax(logits, dim=1)[:, 0]  # log P(positive) per anchor
    per_anchor = -log_p
    if reweight:  # MACL: V = 1/(1 - P), detached, cancels InfoNCE's (1 - P) gradient factor
        v = 1.0 / (1.0 - log_p.detach().exp() + _V_EPS)
        per_anchor = v * per_anchor
    with torch.no_grad():
        accuracy = (pos[:, None] > neg).all(dim=1).to(pos.dtype).mean()
    if gather_distributed:
        accuracy = _all_reduce_mean(accuracy, pos.shape[0])
    loss = per_anchor.mean() if reduction == "mean" else per_anchor
    return ContrastiveOutput(
        loss=loss,
        temperature=temperature.detach(),
        alignment=alignment.detach(),
        accuracy=accuracy.detach(),
        num_negatives=int(neg.shape[1]),
    )


# ----------------------------------------------------------------------------------------
# InfoNCE / NT-Xent
# ----------------------------------------------------------------------------------------
def info_nce_loss(
    z1: Tensor,
    z2: Tensor,
    negatives: Tensor | None = None,
    *,
    temperature: float = 0.1,
    arrangement: Arrangement = "simclr",
    reduction: Reduction = "mean",
    gather_distributed: bool = False,
) -> ContrastiveOutput:
    """InfoNCE / NT-Xent: ``ℓ_i = −log softmax([s(i, i⁺), s(i, negatives)] / τ)[0]``.

    Args:
        z1: ``[B, D]`` embeddings of the first view (or MoCo queries); normalised here.
        z2: ``[B, D]`` embeddings of the second view (or MoCo positive keys).
        negatives: optional ``[K, D]`` extra negatives (queue / memory bank), shared by every
            anchor.
        temperature: τ > 0.
        arrangement: ``"simclr"`` (2B anchors, both views as candidates) or ``"moco"`` (B
            queries, keys as candidates); see the module docstring.
        reduction: ``"mean"`` over anchors or ``"none"`` (``[N]`` per anchor: the ``2B``
            anchors ``cat(z1, z2)`` in SimCLR, the ``B`` queries in MoCo).
        gather_distributed: gather candidates (SimCLR) and statistics over DDP ranks.

    Returns:
        :class:`ContrastiveOutput` (loss, τ, alignment, accuracy).
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    with torch.autocast(device_type=z1.device.type, enabled=False):
        pos, neg = _positive_and_negatives(z1, z2, negatives, arrangement, gather_distributed)
        with torch.no_grad():
            alignment = pos.mean()
            if gather_distributed:
                alignment = _all_reduce_mean(alignment, pos.shape[0])
        tau = pos.new_tensor(temperature)
        return _finish(pos, neg, tau, alignment, False, reduction, gather_distributed)


def _validate_macl(tau0: float, alpha: float, a0: float) -> None:
    if not tau0 > 0:
        raise ValueError(f"tau0 must be > 0, got {tau0}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if not 0.0 <= a0 <= 1.0:
        raise ValueError(f"a0 must be in [0, 1], got {a0}")


def macl_temperature(alignment: Tensor | float, tau0: float, alpha: float, a0: float) -> Tensor:
    """MACL's alignment-adaptive temperature ``τ = τ0·(1 + α·(A − A0))``.

    Higher alignment ``A`` (mean positive cosine) gives a higher τ. τ is floored at
    ``1e-3·τ0``, a value only reached in the degenerate corner ``A ≈ −1`` with ``α(1+A0) ≥ 1``.
    """
    _validate_macl(tau0, alpha, a0)
    a = torch.as_tensor(alignment)
    return (tau0 * (1.0 + alpha * (a - a0))).clamp_min(_TAU_FLOOR * tau0)


def macl_loss(
    z1: Tensor,
    z2: Tensor,
    negatives: Tensor | None = None,
    *,
    tau0: float = 0.1,
    alpha: float = 0.5,
    a0: float = 0.0,
    arrangement: Arrangement = "simclr",
    reduction: Reduction = "mean",
    gather_distributed: bool = False,
) -> ContrastiveOutput:
    """Model-aware contrastive loss (MACL, ICML'23).

    ``A`` = mean positive cosine (detached); ``τ = τ0·(1 + α(A − A0))``;
    ``P = softmax([pos, neg]/τ)[:, 0]``; ``V = 1/(1 − P + 1e-8)`` (detached);
    loss = mean over anchors of ``−V·log P``. Same arguments as :func:`info_nce_loss`, with
    ``tau0`` > 0 and ``alpha``, ``a0`` in [0, 1].
    """
    _validate_macl(tau0, alpha, a0)
    with torch.autocast(device_type=z1.device.type, enabled=False):
        pos, neg = _positive_and_negatives(z1, z2, negatives, arrangement, gather_distributed)
        with torch.no_grad():
            alignment = pos.mean()
            if gather_distributed:
                alignment = _all_reduce_mean(alignment, pos.shape[0])
            tau = macl_temperature(alignment, tau0, alpha, a0)
        return _finish(pos, neg, tau, alignment, True, reduction, gather_distributed)


class _TwoViewLoss(nn.Module):
    """Shared calling convention of :class:`InfoNCELoss` and :class:`MACLLoss`.

    ``loss(z1, z2)`` returns the scalar loss; the full :class:`ContrastiveOutput` of the last
    call (temperature, alignment, accuracy) is kept in :attr:`last_output`, and
    :meth:`compute` returns it directly. Subclasses implement :meth:`_loss`.
    """

    def __init__(self, arrangement: Arrangement, gather_distributed: bool) -> None:
        super().__init__()
        if arrangement not in _ARRANGEMENTS:
            raise ValueError(f"arrangement must be one of {_ARRANGEMENTS}, got {arrangement!r}")
        self.arrangement: Arrangement = arrangement
        self.gather_distributed = gather_distributed
        self.last_output: ContrastiveOutput | None = None

    def _loss(self, z1: Tensor, z2: Tensor, negatives: Tensor | None) -> ContrastiveOutput:
        raise NotImplementedError

    def compute(self, z1: Tensor, z2: Tensor, negatives: Tensor | None = None) -> ContrastiveOutput:
        """The loss and its statistics for ``z1, z2: [B, D]`` (and ``negatives: [K, D]``)."""
        out = self._loss(z1, z2, negatives)
        self.last_output = out
        return out

    def forward(self, z1: Tensor, z2: Tensor, negatives: Tensor | None = None) -> Tensor:
        """Scalar loss for ``z1, z2: [B, D]`` (optional ``negatives: [K, D]``)."""
        return self.compute(z1, z2, negatives).loss


class InfoNCELoss(_TwoViewLoss):
    """InfoNCE / NT-Xent module over :func:`info_nce_loss`.

    ``loss(z1, z2)`` returns the scalar loss; the full :class:`ContrastiveOutput` of the last
    call (temperature, alignment, accuracy) is kept in :attr:`last_output`, and
    :meth:`compute` returns it directly.

    Args:
        temperature: τ > 0.
        arrangement: ``"simclr"`` or ``"moco"`` (see the module docstring).
        gather_distributed: gather candidates and statistics across DDP ranks.
    """

    def __init__(
        self,
        temperature: float = 0.1,
        *,
        arrangement: Arrangement = "simclr",
        gather_distributed: bool = False,
    ) -> None:
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        super().__init__(arrangement, gather_distributed)
        self.temperature = float(temperature)

    def _loss(self, z1: Tensor, z2: Tensor, negatives: Tensor | None) -> ContrastiveOutput:
        return info_nce_loss(
            z1,
            z2,
            negatives,
            temperature=self.temperature,
            arrangement=self.arrangement,
            gather_distributed=self.gather_distributed,
        )

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, arrangement={self.arrangement!r}"


class MACLLoss(_TwoViewLoss):
    """MACL module over :func:`macl_loss`; same calling convention as :class:`InfoNCELoss`.

    Args:
        tau0: base temperature τ0 > 0.
        alpha: sensitivity α ∈ [0, 1] of τ to the alignment.
        a0: reference alignment A0 ∈ [0, 1].
        arrangement: ``"simclr"`` or ``"moco"``.
        gather_distributed: gather candidates and statistics across DDP ranks.
    """

    def __init__(
        self,
        tau0: float = 0.1,
        alpha: float = 0.5,
        a0: float = 0.0,
        *,
        arrangement: Arrangement = "simclr",
        gather_distributed: bool = False,
    ) -> None:
        _validate_macl(tau0, alpha, a0)
        super().__init__(arrangement, gather_distributed)
        self.tau0 = float(tau0)
        self.alpha = float(alpha)
        self.a0 = float(a0)

    def _loss(self, z1: Tensor, z2: Tensor, negatives: Tensor | None) -> ContrastiveOutput:
        return macl_loss(
            z1,
            z2,
            negatives,
            tau0=self.tau0,
            alpha=self.alpha,
            a0=self.a0,
            arrangement=self.arrangement,
            gather_distributed=self.gather_distributed,
        )

    def extra_repr(self) -> str:
        return (
            f"tau0={self.tau0}, alpha={self.alpha}, a0={self.a0}, arrangement={self.arrangement!r}"
        )


# ----------------------------------------------------------------------------------------
# Supervised contrastive
# ----------------------------------------------------------------------------------------
def supcon_loss(
    features: Tensor,
    labels: Tensor,
    *,
    temperature: float = 0.1,
    reduction: Reduction = "mean",
    gather_distributed: bool = False,
) -> Tensor:
    """Supervised contrastive loss (Khosla et al. 2020, the "L_out" form).

    Every sample is an anchor; its positives are the other samples with the same label and
    its candidates all other samples:
    ``ℓ_i = −1/|P(i)| Σ_{p∈P(i)} log( exp(s_ip/τ) / Σ_{a≠i} exp(s_ia/τ) )``, with ``s`` the
    cosine similarity. Anchors without any positive are left out of the mean (a batch with
    none at all gives a zero loss that still carries a graph, without a host sync).

    Args:
        features: ``[N, D]`` embeddings, or ``[N, V, D]`` for ``V`` views per sample.
        labels: ``[N]`` integer class labels.
        temperature: τ > 0.
        reduction: ``"mean"`` over anchors with positives, or ``"none"`` (``[N·V]`` per anchor,
            view-major, zero for anchors without positives).
        gather_distributed: use every rank's samples as candidates (with gradients); the mean
            is normalised by the global number of valid anchors so that the per-rank losses
            average to the global-batch loss.

    Returns:
        The loss.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if features.ndim == 3:
        n, views, d = features.shape
        feats = features.transpose(0, 1).reshape(views * n, d)
        labels = labels.repeat(views) if labels.ndim == 1 else labels
    elif features.ndim == 2:
        feats = features
    else:
        raise ValueError(f"features must be [N, D] or [N, V, D], got {tuple(features.shape)}")
    if labels.ndim != 1 or labels.shape[0] != feats.shape[0]:
        raise ValueError(
            f"labels must be [N] matching features {tuple(features.shape)}, "
            f"got {tuple(labels.shape)}"
        )
    if labels.is_floating_point():
        raise TypeError(f"labels must be integers, got {labels.dtype}")
    dtype = _compute_dtype(feats)
    with torch.autocast(device_type=feats.device.type, enabled=False):
        z = F.normalize(feats.to(dtype), dim=1)
        m = z.shape[0]
        world, rank = (get_world_size(), get_rank()) if gather_distributed else (1, 0)
        if world > 1:
            cand = all_gather_with_grad(z)
            cand_labels = all_gather_with_grad(labels)
            if cand.shape[0] != world * m:
                raise RuntimeError("every rank must pass the same batch size when gathering")
        else:
            cand, cand_labels = z, labels
        logits = z @ cand.T / temperature  # [M, W·M]
        rows = torch.arange(m, device=z.device)
        self_idx = rows + rank * m
        not_self = torch.ones_like(logits, dtype=torch.bool)
        not_self[rows, self_idx] = False
        log_prob = logits.masked_fill(~not_self, float("-inf")).log_softmax(dim=1)
        positive = (labels[:, None] == cand_labels[None, :]) & not_self
        n_pos = positive.sum(dim=1)
        pos_log_prob = log_prob.masked_fill(~positive, 0.0).sum(dim=1)
        valid = n_pos > 0
        per_anchor = torch.where(valid, -pos_log_prob / n_pos.clamp_min(1), 0.0)
        if reduction == "none":
            return per_anchor
        count = valid.sum().to(dtype)
        if world > 1:  # normalise by the global count: the rank losses average to the total
            dist.all_reduce(count, op=dist.ReduceOp.SUM)
            count = count / world
        return per_anchor.sum() / count.clamp_min(1.0)


class SupConLoss(nn.Module):
    """Supervised contrastive loss module over :func:`supcon_loss`: ``loss(features, labels)``.

    Args:
        temperature: τ > 0.
        gather_distributed: use every DDP rank's samples as candidates.
    """

    def __init__(self, temperature: float = 0.1, *, gather_distributed: bool = False) -> None:
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)
        self.gather_distributed = gather_distributed

    def forward(self, features: Tensor, labels: Tensor) -> Tensor:
        """Loss for ``features: [N, D]`` or ``[N, V, D]`` and ``labels: [N]``."""
        return supcon_loss(
            features,
            labels,
            temperature=self.temperature,
            gather_distributed=self.gather_distributed,
        )

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"
