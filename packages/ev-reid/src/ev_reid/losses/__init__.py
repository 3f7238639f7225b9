"""Re-id losses: BoT's identity and triplet losses, and UP-ReID's I² regularisation terms."""

from ev_reid.losses.bot import (
    CrossEntropyLabelSmooth,
    DistanceMetric,
    TripletLoss,
    batch_hard_triplet_loss,
    label_smoothed_cross_entropy,
    triplet_distance,
)
from ev_reid.losses.upreid import (
    GlobalConsistencyTerm,
    LocalNegatives,
    LocalStripeContrastTerm,
    global_consistency_loss,
    local_stripe_contrast,
)

__all__ = [
    "CrossEntropyLabelSmooth",
    "DistanceMetric",
    "GlobalConsistencyTerm",
    "LocalNegatives",
    "LocalStripeContrastTerm",
    "TripletLoss",
    "batch_hard_triplet_loss",
    "global_consistency_loss",
    "label_smoothed_cross_entropy",
    "local_stripe_contrast",
    "triplet_distance",
]
