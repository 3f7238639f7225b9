"""PointMatch: weakly supervised point-cloud segmentation by consistency regularisation
with an EMA teacher's pseudo-labels (Wu et al., Computers & Graphics 2023, arXiv 2202.10705).

No official code exists; the design follows SYSTEMS.md §5.1's recommendations plus a class
prior from the weak labels (distribution alignment and class-balanced pseudo-labels), see
:mod:`ev_points.pointmatch.train`."""

from ev_points.pointmatch.augment import AugmentConfig, strong_view, weak_view
from ev_points.pointmatch.labels import (
    align_distribution,
    class_balance_weights,
    label_prior,
    pseudo_labels,
    sample_weak_labels,
    weak_label_mask,
)
from ev_points.pointmatch.train import (
    LABELLED_VIEWS,
    METHODS,
    PointMatchConfig,
    TrainOutcome,
    WeakLabelDataset,
    evaluate,
    make_step_fn,
    predict_scene,
    train_pointmatch,
)

__all__ = [
    "LABELLED_VIEWS",
    "METHODS",
    "AugmentConfig",
    "PointMatchConfig",
    "TrainOutcome",
    "WeakLabelDataset",
    "align_distribution",
    "class_balance_weights",
    "evaluate",
    "label_prior",
    "make_step_fn",
    "predict_scene",
    "pseudo_labels",
    "sample_weak_labels",
    "strong_view",
    "train_pointmatch",
    "weak_label_mask",
    "weak_view",
]
