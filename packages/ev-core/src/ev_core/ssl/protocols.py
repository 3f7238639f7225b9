"""What :class:`~ev_core.ssl.ContrastiveTrainer` calls: the step context, loss terms, losses.

* :class:`StepContext`: everything an extra loss term may use in one micro-step;
* :class:`LossTerm` / :class:`LossTermSpec`: a named, weighted extra loss term;
* :class:`ContrastiveLoss`: the instance loss interface (``InfoNCELoss``, ``MACLLoss``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from torch import Tensor, nn

from ev_core.losses.contrastive import ContrastiveOutput
from ev_core.ssl.encoder import EncoderOutput
from ev_core.ssl.queue import NegativeQueue
from ev_core.ssl.views import ViewBatch

__all__ = ["ContrastiveLoss", "LossTerm", "LossTermSpec", "StepContext"]


@dataclass
class StepContext:
    """Everything an extra loss term may use in one (micro-)step.

    Attributes:
        views: the batch's views (``view1``, ``view2``, optional ``original``, ``extras``).
        online: online-encoder outputs for ``(view1, view2)`` (with gradients).
        momentum: momentum-encoder outputs for ``(view1, view2)`` (MoCo; no gradients).
        original: target-encoder output for ``views.original`` (no gradients): the momentum
            encoder under MoCo, else the online encoder in eval mode; ``None`` without original.
        instance: the instance-contrastive loss output (``None`` if ``instance_weight == 0``).
        model: the online encoder (unwrapped from DDP).
        momentum_encoder: the momentum encoder, or ``None``.
        queue: the MoCo negatives queue, or ``None``.
        distributed: whether losses should gather across DDP ranks (pass it as
            ``gather_distributed=`` to :mod:`ev_core.losses`).
        step: optimizer steps done so far.
        epoch: current epoch (0-based).
    """

    views: ViewBatch
    online: tuple[EncoderOutput, EncoderOutput]
    momentum: tuple[EncoderOutput, EncoderOutput] | None
    original: EncoderOutput | None
    instance: ContrastiveOutput | None
    model: nn.Module
    momentum_encoder: nn.Module | None
    queue: NegativeQueue | None
    distributed: bool
    step: int
    epoch: int


class LossTerm(Protocol):
    """An extra loss term: ``term(ctx) -> Tensor`` (scalar) or ``Mapping[str, Tensor]``.

    Every returned scalar is added to the total loss times the term's weight and logged under
    ``name`` (or ``name/key``). Terms must not own parameters: put trainable parts in the
    encoder's ``extra_heads`` so that DDP synchronises them.
    """

    def __call__(self, ctx: StepContext, /) -> Tensor | Mapping[str, Tensor]: ...


@dataclass
class LossTermSpec:
    """A named, weighted :class:`LossTerm`."""

    name: str
    fn: LossTerm
    weight: float = 1.0


class ContrastiveLoss(Protocol):
    """The instance loss interface (:class:`~ev_core.losses.InfoNCELoss`, ``MACLLoss``)."""

    @property
    def arrangement(self) -> str: ...

    @property
    def gather_distributed(self) -> bool: ...

    def compute(
        self, z1: Tensor, z2: Tensor, negatives: Tensor | None = None
    ) -> ContrastiveOutput: ...
