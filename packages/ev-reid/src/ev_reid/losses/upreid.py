"""UP-ReID's intra-identity (I²) regularisation: global consistency and local stripe contrast.

Both terms come as functions on tensors and as :class:`ev_core.ssl.LossTerm` adapters that
read what they need from the contrastive trainer's step (:class:`ev_core.ssl.StepContext`).

The abstract describes the local term as an "intrinsic contrastive constraint among local
patches of each image". Two readings are offered (:data:`LocalNegatives`):

* ``"batch"`` (default, SYSTEMS.md's recommended design): stripe ``s`` of image ``i`` in one
  view has the same stripe in the other view as its positive and *every* other stripe
  embedding of the batch (other stripes of the same image, every stripe of other images, both
  views) as negatives: ``2·B·S − 2`` negatives;
* ``"image"``: only the other stripes of the *same* image (both views) are negatives:
  ``2·S − 2`` negatives; the term then only asks stripes of one image to differ from each other.

See the package README for the default and the benchmark comparing both.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from ev_core.losses import ContrastiveOutput, info_nce_loss, macl_loss, macl_temperature
from ev_core.ssl import StepContext

__all__ = [
    "GlobalConsistencyTerm",
    "LocalNegatives",
    "LocalStripeContrastTerm",
    "global_consistency_loss",
    "local_stripe_contrast",
]

ContrastiveKind = Literal["infonce", "macl"]
LocalNegatives = Literal["batch", "image"]
"""Negatives of the local stripe contrast: every stripe of the batch, or the same image's."""

_MACL_V_EPS = 1e-8  # MACL's V = 1 / (1 - P + eps), as ev_core.losses.macl_loss


def global_consistency_loss(
    queries: Sequence[torch.Tensor], key_original: torch.Tensor
) -> torch.Tensor:
    """UP-ReID's global consistency ``mean_v (1 − cos(q_v, sg(k_orig)))``, averaged over the batch.

    Args:
        queries: one ``[B, D]`` online embedding per augmented view.
        key_original: ``[B, D]`` target embedding of the original images (detached here).

    Returns:
        Scalar loss in ``[0, 2]``, computed in float32 (float64 stays float64).
    """
    if not queries:
        raise ValueError("global_consistency_loss needs at least one view")
    dtype = torch.float64 if key_original.dtype == torch.float64 else torch.float32
    k = F.normalize(key_original.detach().to(dtype), dim=1)
    terms = []
    for q in queries:
        if q.shape != key_original.shape:
            raise ValueError(
                f"view embedding {tuple(q.shape)} and original {tuple(key_original.shape)} differ"
            )
        cos = (F.normalize(q.to(dtype), dim=1) * k).sum(dim=1)
        terms.append((1.0 - cos).mean())
    return torch.stack(terms).mean()


def _within_image_contrast(
    stripes1: torch.Tensor,
    stripes2: torch.Tensor,
    *,
    loss: ContrastiveKind,
    temperature: float,
    macl_alpha: float,
    macl_a0: float,
) -> ContrastiveOutput:
    """Local contrast whose candidates are the ``2·S`` stripe embeddings of one image."""
    b, s, _ = stripes1.shape
    if s < 2:
        raise ValueError("the within-image local contrast needs at least 2 stripes (negatives)")
    dtype = torch.float64 if stripes1.dtype == torch.float64 else torch.float32
    with torch.autocast(device_type=stripes1.device.type, enabled=False):
        z = F.normalize(torch.cat([stripes1, stripes2], dim=1).to(dtype), dim=2)  # [B, 2S, D]
        sim = z @ z.transpose(1, 2)  # [B, 2S, 2S]
        rows = torch.arange(2 * s, device=z.device)
        partner = (rows + s) % (2 * s)
        pos = sim[:, rows, partner]  # [B, 2S]
        keep = (rows[:, None] != rows[None, :]) & (partner[:, None] != rows[None, :])
        neg = sim[:, keep].view(b, 2 * s, 2 * s - 2)
        pos, neg = pos.reshape(-1), neg.reshape(b * 2 * s, -1)
        with torch.no_grad():
            alignment = pos.mean()
            if loss == "macl":
                tau = macl_temperature(alignment, temperature, macl_alpha, macl_a0).to(pos)
            elif loss == "infonce":
                tau = pos.new_tensor(temperature)
            else:
                raise ValueError(f"loss must be 'infonce' or 'macl', got {loss!r}")
            accuracy = (pos[:, None] > neg).all(dim=1).to(pos.dtype).mean()
        log_p = F.log_softmax(torch.cat([pos[:, None], neg], dim=1) / tau, dim=1)[:, 0]
        per_anchor = -log_p
        if loss == "macl":  # V = 1/(1 − P), detached: cancels InfoNCE's (1 − P) gradient factor
            per_anchor = per_anchor / (1.0 - log_p.detach().exp() + _MACL_V_EPS)
    return ContrastiveOutput(
        loss=per_anchor.mean(),
        temperature=tau.detach(),
        alignment=alignment,
        accuracy=accuracy,
        num_negatives=2 * s - 2,
    )


def local_stripe_contrast(
    stripes1: torch.Tensor,
    stripes2: torch.Tensor,
    *,
    negatives: LocalNegatives = "batch",
    loss: ContrastiveKind = "infonce",
    temperature: float = 0.2,
    macl_alpha: float = 0.5,
    macl_a0: float = 0.0,
    gather_distributed: bool = False,
) -> ContrastiveOutput:
    """UP-ReID's intrinsic local contrast among horizontal stripes.

    Stripe ``s`` of image ``i`` in one view has the same stripe of the same image in the other
    view as its positive (SimCLR's symmetric arrangement: every stripe of both views is an
    anchor). Its negatives are, with ``negatives="batch"``, all other ``2·B·S − 2`` stripe
    embeddings of the batch (of every DDP rank with ``gather_distributed``), or, with
    ``negatives="image"``, only the ``2·S − 2`` other stripes of the same image.

    Args:
        stripes1: ``[B, S, D]`` stripe embeddings of view 1.
        stripes2: ``[B, S, D]`` stripe embeddings of view 2.
        negatives: ``"batch"`` or ``"image"`` (see :data:`LocalNegatives`).
        loss: ``"infonce"`` (temperature τ) or ``"macl"`` (τ0 = ``temperature``).
        temperature: τ (UP-ReID: 0.2).
        macl_alpha: MACL's α.
        macl_a0: MACL's A0.
        gather_distributed: take negatives from every DDP rank (``"batch"`` only).

    Returns:
        The :class:`~ev_core.losses.ContrastiveOutput` (loss, τ, alignment, accuracy).
    """
    if stripes1.ndim != 3 or stripes1.shape != stripes2.shape:
        raise ValueError(
            f"stripe embeddings must both be [B, S, D], got {tuple(stripes1.shape)} and "
            f"{tuple(stripes2.shape)}"
        )
    if loss not in ("infonce", "macl"):
        raise ValueError(f"loss must be 'infonce' or 'macl', got {loss!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if negatives == "image":
        return _within_image_contrast(
            stripes1,
            stripes2,
            loss=loss,
            temperature=temperature,
            macl_alpha=macl_alpha,
            macl_a0=macl_a0,
        )
    if negatives != "batch":
        raise ValueError(f"negatives must be 'batch' or 'image', got {negatives!r}")
    z1, z2 = stripes1.flatten(0, 1), stripes2.flatten(0, 1)
    if loss == "macl":
        return macl_loss(
            z1,
            z2,
            tau0=temperature,
            alpha=macl_alpha,
            a0=macl_a0,
            gather_distributed=gather_distributed,
        )
    return info_nce_loss(z1, z2, temperature=temperature, gather_distributed=gather_distributed)


@dataclass
class GlobalConsistencyTerm:
    """:class:`ev_core.ssl.LossTerm` computing :func:`global_consistency_loss` from a step.

    Uses the online embeddings of both views and the trainer's target-encoder embedding of
    the original images (``ctx.original``; the momentum encoder under MoCo).
    """

    def __call__(self, ctx: StepContext) -> torch.Tensor:
        if ctx.original is None:
            raise ValueError(
                "the global consistency term needs the original images: load data with "
                "ev_reid.data.build_pretrain_views (view1, view2, original)"
            )
        queries = [ctx.online[0].embedding, ctx.online[1].embedding]
        return global_consistency_loss(queries, ctx.original.embedding)


@dataclass
class LocalStripeContrastTerm:
    """:class:`ev_core.ssl.LossTerm` computing :func:`local_stripe_contrast` from a step.

    Reads the ``"stripes"`` extra of both views' online outputs
    (:class:`~ev_reid.models.StripeProjection`).
    """

    loss: ContrastiveKind = "infonce"
    temperature: float = 0.2
    macl_alpha: float = 0.5
    macl_a0: float = 0.0
    negatives: LocalNegatives = "batch"

    def __call__(self, ctx: StepContext) -> torch.Tensor:
        o1, o2 = ctx.online
        if "stripes" not in o1.extras:
            raise ValueError(
                "the encoder has no 'stripes' head: build it with build_upreid_encoder"
            )
        return local_stripe_contrast(
            o1.extras["stripes"],
            o2.extras["stripes"],
            negatives=self.negatives,
            loss=self.loss,
            temperature=self.temperature,
            macl_alpha=self.macl_alpha,
            macl_a0=self.macl_a0,
            gather_distributed=ctx.distributed,
        ).loss
