"""Re-id models: timm / ev-core backbones with GeM/average pooling, BNNeck and stripe parts,
and the adapters that pre-train those backbones with :mod:`ev_core.ssl`."""

from ev_reid.models.adapters import FeatureMapBackbone, StripeProjection
from ev_reid.models.pooling import GeneralizedMeanPooling, gem, stripe_pool
from ev_reid.models.reid import (
    BackboneLoadReport,
    BackboneWeightsError,
    ReidModel,
    ReidModelConfig,
    ReidOutput,
    create_backbone,
    load_backbone_weights,
    load_reid_model,
    set_last_stride_1,
)

__all__ = [
    "BackboneLoadReport",
    "BackboneWeightsError",
    "FeatureMapBackbone",
    "GeneralizedMeanPooling",
    "ReidModel",
    "ReidModelConfig",
    "ReidOutput",
    "StripeProjection",
    "create_backbone",
    "gem",
    "load_backbone_weights",
    "load_reid_model",
    "set_last_stride_1",
    "stripe_pool",
]
