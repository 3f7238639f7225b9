"""Self-supervised (contrastive) pre-training core.

* :mod:`ev_core.ssl.encoder`: backbone-agnostic :class:`ContrastiveEncoder` (features,
  projection embedding, feature map, extra heads), momentum-encoder helpers.
* :mod:`ev_core.ssl.queue`: MoCo's :class:`NegativeQueue`.
* :mod:`ev_core.ssl.views`: :class:`ViewBatch`, :class:`TwoViewTransform`, view generators.
* :mod:`ev_core.ssl.config`: :class:`PretrainConfig`, every setting of a run.
* :mod:`ev_core.ssl.protocols`: :class:`StepContext`, :class:`LossTerm`/:class:`LossTermSpec`
  (extra loss terms) and the :class:`ContrastiveLoss` interface.
* :mod:`ev_core.ssl.trainer`: :class:`ContrastiveTrainer` / :func:`pretrain` (SimCLR or MoCo)
  on :class:`ev_core.training.Engine` (AMP, accumulation, atomic checkpoints and exact resume,
  DDP, non-finite-loss stop).
* :mod:`ev_core.ssl.evaluation`: feature extraction, k-NN and linear-probe evaluation.
"""

from ev_core.ssl.config import PretrainConfig
from ev_core.ssl.encoder import (
    ContrastiveEncoder,
    EncoderOutput,
    ExtraHead,
    ProjectionHead,
    backbone_state_dict,
    build_encoder,
    make_momentum_encoder,
    momentum_update,
)
from ev_core.ssl.evaluation import (
    LinearProbeResult,
    extract_features,
    knn_accuracy,
    knn_predict,
    linear_probe,
)
from ev_core.ssl.protocols import ContrastiveLoss, LossTerm, LossTermSpec, StepContext
from ev_core.ssl.queue import NegativeQueue
from ev_core.ssl.trainer import ContrastiveTrainer, PretrainResult, pretrain
from ev_core.ssl.views import (
    TwoViewTransform,
    ViewBatch,
    ViewGenerator,
    as_view_batch,
    move_to_device,
)

__all__ = [
    "ContrastiveEncoder",
    "ContrastiveLoss",
    "ContrastiveTrainer",
    "EncoderOutput",
    "ExtraHead",
    "LinearProbeResult",
    "LossTerm",
    "LossTermSpec",
    "NegativeQueue",
    "PretrainConfig",
    "PretrainResult",
    "ProjectionHead",
    "StepContext",
    "TwoViewTransform",
    "ViewBatch",
    "ViewGenerator",
    "as_view_batch",
    "backbone_state_dict",
    "build_encoder",
    "extract_features",
    "knn_accuracy",
    "knn_predict",
    "linear_probe",
    "make_momentum_encoder",
    "momentum_update",
    "move_to_device",
    "pretrain",
]
