"""MCL's losses (SYSTEMS §6) and the baselines' (MME entropy minimax).

Every function takes logits/features of one batch and returns a scalar tensor; shapes use
``B`` (batch), ``C`` (classes) and ``D`` (feature dimension).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ev_adapt.ot import sinkhorn_unbalanced

__all__ = [
    "PrototypeMemory",
    "adversarial_entropy_loss",
    "class_contrastive_loss",
    "fixmatch_loss",
    "prototype_ot_loss",
    "supervised_loss",
]


def _full(x: Tensor) -> Tensor:
    """At least float32 (half-precision logits under autocast are upcast; float64 is kept)."""
    return x if x.dtype == torch.float64 else x.float()


def supervised_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy on the labelled source and target images.

    Args:
        logits: ``[B, C]``.
        labels: ``[B]`` class indices.
    """
    return F.cross_entropy(_full(logits), labels)


def fixmatch_loss(
    logits_weak: Tensor, logits_strong: Tensor, threshold: float = 0.95, temperature: float = 1.0
) -> tuple[Tensor, Tensor]:
    """Sample-level consistency: the strong view learns the weak view's confident argmax.

    ``p = softmax(logits_weak.detach() · temperature)`` (MCL's T2), ``mask = max p ≥ threshold``,
    ``loss = mean(CE(logits_strong, argmax p) · mask)``.

    Args:
        logits_weak: ``[B, C]`` logits of the weak view (no gradient flows through them).
        logits_strong: ``[B, C]`` logits of the strong view.
        threshold: confidence threshold.
        temperature: T2, multiplies the weak logits before the softmax.

    Returns:
        ``(loss, mask)`` with ``mask`` ``[B]`` (float 0/1: which samples contributed).
    """
    probs = torch.softmax(_full(logits_weak.detach()) * temperature, dim=1)
    confidence, pseudo = probs.max(dim=1)
    mask = (confidence >= threshold).float()
    per_sample = F.cross_entropy(_full(logits_strong), pseudo, reduction="none")
    return (per_sample * mask).mean(), mask


def class_contrastive_loss(probs_weak: Tensor, probs_strong: Tensor) -> Tensor:
    """Class-level consistency: the weak/strong class co-occurrence matrix should be diagonal.

    ``M = p_wᵀ p_s`` (``[C, C]``); ``R`` = M row-normalised, ``K`` = M column-normalised;
    ``loss = 1 − ½(mean diag R + mean diag K)`` (= ½(ΣR − tr R)/C + ½(ΣK − tr K)/C).

    Args:
        probs_weak: ``[B, C]`` softmax of the weak view.
        probs_strong: ``[B, C]`` softmax of the strong view.
    """
    m = _full(probs_weak).t() @ _full(probs_strong)
    eps = torch.finfo(m.dtype).tiny
    rows = m / m.sum(dim=1, keepdim=True).clamp_min(eps)
    cols = m / m.sum(dim=0, keepdim=True).clamp_min(eps)
    return 1.0 - 0.5 * (torch.diagonal(rows).mean() + torch.diagonal(cols).mean())


class PrototypeMemory(nn.Module):
    """Per-class EMA of L2-normalised source features, re-normalised after every update.

    Args:
        num_classes: ``C``.
        dim: feature dimension ``D``.
        momentum: EMA momentum (0.9 in MCL).
        warmup_updates: updates during which the momentum is 0 (20 in MCL).
    """

    prototypes: Tensor
    updates: Tensor

    def __init__(
        self, num_classes: int, dim: int, momentum: float = 0.9, warmup_updates: int = 20
    ) -> None:
        super().__init__()
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.momentum = momentum
        self.warmup_updates = warmup_updates
        self.register_buffer("prototypes", torch.zeros(num_classes, dim))
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def update(self, features: Tensor, labels: Tensor) -> None:
        """Fold a batch of source features ``[B, D]`` with labels ``[B]`` into the prototypes.

        Classes absent from the batch keep their prototype.
        """
        momentum = 0.0 if int(self.updates) < self.warmup_updates else self.momentum
        feats = F.normalize(features.detach().float(), dim=1)
        for c in labels.unique().tolist():
            mean = feats[labels == c].mean(dim=0)
            new = momentum * self.prototypes[c] + (1.0 - momentum) * mean
            self.prototypes[c] = F.normalize(new, dim=0)
        self.updates += 1


def prototype_ot_loss(
    features_weak: Tensor,
    features_strong: Tensor,
    prototypes: Tensor,
    reg: float = 1.0,
    reg_m: float = 1.0,
    num_iters: int = 100,
) -> tuple[Tensor, Tensor]:
    """Inter-domain consistency: OT assigns weak-view features to prototypes; the strong view is pulled.

    Cost ``1 − cos(prototype_c, feat_w_j)`` (``[C, B]``, no gradient), plan from
    :func:`~ev_adapt.ot.sinkhorn_unbalanced` with uniform masses ``1/C`` and ``1/B``,
    assignment ``argmax_c γ[c, j]``, ``loss = mean_j (1 − cos(feat_s_j, prototype_{assign_j}))``.

    Args:
        features_weak: ``[B, D]`` weak-view features.
        features_strong: ``[B, D]`` strong-view features.
        prototypes: ``[C, D]`` class prototypes (L2-normalised).
        reg: entropic regularisation.
        reg_m: marginal relaxation.
        num_iters: Sinkhorn iterations.

    Returns:
        ``(loss, assignment [B])``.
    """
    with torch.no_grad():
        protos = F.normalize(_full(prototypes), dim=1)
        cost = 1.0 - protos @ F.normalize(_full(features_weak.detach()), dim=1).to(protos.dtype).t()
        n_c, n_b = cost.shape
        a = torch.full((n_c,), 1.0 / n_c, device=cost.device, dtype=torch.float64)
        b = torch.full((n_b,), 1.0 / n_b, device=cost.device, dtype=torch.float64)
        plan = sinkhorn_unbalanced(a, b, cost.double(), reg, reg_m, num_iters=num_iters)
        assignment = plan.argmax(dim=0)
    target = protos[assignment]
    cos = F.cosine_similarity(
        _full(features_strong), target.to(_full(features_strong).dtype), dim=1
    )
    return (1.0 - cos).mean(), assignment


def adversarial_entropy_loss(logits_reversed: Tensor, weight: float = 0.1) -> Tensor:
    """MME's minimax entropy term on unlabelled target logits computed through gradient reversal.

    ``loss = weight · mean_j Σ_c p_jc log p_jc`` (= −weight·entropy): minimising it makes the
    classifier *maximise* the entropy while the reversed gradient makes the feature extractor
    minimise it.

    Args:
        logits_reversed: ``[B, C]`` logits of features passed through
            :func:`~ev_adapt.models.grad_reverse`.
        weight: λ (0.1 in MME).
    """
    probs = torch.softmax(_full(logits_reversed), dim=1)
    return weight * (probs * torch.log(probs + 1e-5)).sum(dim=1).mean()
