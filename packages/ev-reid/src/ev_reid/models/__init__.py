"""Re-id models: timm / ev-core backbones with GeM/average pooling, BNNeck and stripe parts."""

from ev_reid.models.pooling import GeneralizedMeanPooling, gem, stripe_pool
from ev_reid.models.reid import (
    BackboneLoadReport,
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
    "GeneralizedMeanPooling",
    "ReidModel",
    "ReidModelConfig",
    "ReidOutput",
    "create_backbone",
    "gem",
    "load_backbone_weights",
    "load_reid_model",
    "set_last_stride_1",
    "stripe_pool",
]
