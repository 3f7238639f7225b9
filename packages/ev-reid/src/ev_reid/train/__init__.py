"""Supervised re-id fine-tuning with the BoT recipe (Luo et al., CVPRW 2019), on :mod:`ev_core.training`.

Label-smoothed identity loss (ε 0.1) on the BNNeck logits + batch-hard triplet loss (margin
0.3) on the pooled feature, P×K identity-balanced batches (16 × 4), Adam (3.5e-4, weight decay
5e-4), linear warm-up over 10 epochs from 1% of the LR, ×0.1 at epochs 40 and 70, 120 epochs,
random erasing 0.5, last stride 1. The model starts from an UP-ReID checkpoint
(``backbone.safetensors`` of :func:`ev_reid.pretrain.pretrain_upreid`), an ImageNet/timm
checkpoint file, timm's pretrained weights, or scratch.

The loop is :class:`ev_core.training.Engine` (device, AMP, DDP, atomic checkpoints, exact
resume, non-finite-loss stop, divergence warning, progress and ``metrics.jsonl``); this module
adds the BoT step, the per-epoch LR, the per-epoch history and evaluation. Before any training
it checks every output folder is writable, every image of the dataset is readable and the
initial weights fill the backbone (unless ``allow_partial``).

Outputs in ``out_dir``: ``config.json`` (the resolved :class:`TrainConfig` and environment),
``checkpoints/step-XXXXXXXX/`` (resume; see :class:`ev_core.training.CheckpointManager`),
``model.safetensors`` (final weights, written before the final evaluation; the
:class:`~ev_reid.models.ReidModelConfig` in the JSON beside it, so
:func:`ev_reid.inference.load_for_inference` rebuilds it), ``metrics.jsonl`` (the engine's
log) and ``metrics.json`` (per-epoch history and the final evaluation).

Runs single-process or under ``torchrun`` (DDP): each of the W ranks takes ``P/W`` identities
× K images of every step (:class:`~ev_reid.data.DistributedRandomIdentitySampler`), gradients
are averaged by DDP, and rank 0 evaluates and writes the outputs. Inference (loading a trained
model, features, evaluation, indexing, search) is :mod:`ev_reid.inference`.
"""

from ev_reid.train.config import TrainConfig, bot_lr_factor, default_num_workers
from ev_reid.train.criterion import ReidCriterion, train_step
from ev_reid.train.loop import TrainResult, train

__all__ = [
    "ReidCriterion",
    "TrainConfig",
    "TrainResult",
    "bot_lr_factor",
    "default_num_workers",
    "train",
    "train_step",
]
