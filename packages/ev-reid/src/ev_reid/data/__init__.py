"""Re-id data pipeline: identity-balanced samplers and image transforms."""

from __future__ import annotations

from ev_reid.data.sampler import (
    DistributedRandomIdentitySampler,
    RandomIdentitySampler,
    identity_batches,
)
from ev_reid.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PretrainViewConfig,
    PretrainViews,
    ReidTransformConfig,
    build_pretrain_views,
    build_test_transform,
    build_train_transform,
    min_aligned_crop_scale,
)

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "DistributedRandomIdentitySampler",
    "PretrainViewConfig",
    "PretrainViews",
    "RandomIdentitySampler",
    "ReidTransformConfig",
    "build_pretrain_views",
    "build_test_transform",
    "build_train_transform",
    "identity_batches",
    "min_aligned_crop_scale",
]
