"""ev-adapt: semi-supervised domain adaptation — MCL (multi-level consistency learning) and baselines.

* :mod:`ev_adapt.losses`: supervised, FixMatch-style sample-level, class-level contrastive and
  prototype-OT losses (+ MME's minimax entropy for the baseline);
* :mod:`ev_adapt.ot`: unbalanced Sinkhorn in torch (batched, log-domain);
* :mod:`ev_adapt.data`: MME image lists, the digits domain shift, replayable batches;
* :mod:`ev_adapt.trainer`: MCL and baselines on ``ev_core.training``.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("ev-adapt")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

from ev_adapt.config import METHODS, AdaptConfig
from ev_adapt.models import AdaptModelConfig, AdaptNet, build_model
from ev_adapt.ot import sinkhorn_unbalanced
from ev_adapt.trainer import AdaptResult, train_adaptation

__all__ = [
    "METHODS",
    "AdaptConfig",
    "AdaptModelConfig",
    "AdaptNet",
    "AdaptResult",
    "__version__",
    "build_model",
    "sinkhorn_unbalanced",
    "train_adaptation",
]
