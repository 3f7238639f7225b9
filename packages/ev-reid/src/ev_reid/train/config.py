"""The settings of a BoT fine-tuning run: :class:`TrainConfig` and its LR schedule."""

from __future__ import annotations

import bisect
import os
from dataclasses import dataclass, field
from typing import Literal

from ev_reid.data.transforms import ReidTransformConfig
from ev_reid.losses import DistanceMetric
from ev_reid.models.reid import ReidModelConfig

__all__ = ["TrainConfig", "bot_lr_factor", "default_num_workers"]


def default_num_workers() -> int:
    """DataLoader workers to use by default: the CPUs this process may run on, at most 4."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(0, min(4, cpus))


def _bot_model() -> ReidModelConfig:
    return ReidModelConfig(backbone="resnet50", last_stride_1=True)


@dataclass
class TrainConfig:
    """Every setting of a fine-tuning run (dumped as ``config.json`` beside the outputs).

    Attributes:
        out_dir: output folder.
        dataset: dataset name for :func:`ev_reid.datasets.create`.
        data_root: the dataset's root folder.
        model: the model; ``num_classes`` is set from the training split.
        init_checkpoint: initial backbone weights: an UP-ReID ``backbone.safetensors``, an
            ev-reid model, or an ImageNet/timm checkpoint (``.pth``/``.safetensors``);
            ``None`` = scratch (or timm's weights with ``model.pretrained``).
        allow_partial: accept an ``init_checkpoint`` that fills only part of the backbone
            (otherwise the run stops before training, with the counts and first names).
        transform: training augmentation (size, flip, padding crop, random erasing); the
            test transform uses its size and normalisation.
        num_identities: P, identities per step (over all ranks; divisible by the world size).
        num_instances: K, images per identity per step.
        epochs: training epochs.
        lr: Adam learning rate.
        weight_decay: Adam weight decay.
        warmup_epochs: linear warm-up epochs.
        warmup_factor: LR fraction at the first warm-up epoch.
        milestones: epochs at which the LR is multiplied by ``gamma``.
        gamma: step-decay factor.
        label_smoothing: ε of the identity loss.
        id_weight: weight of the identity loss (stripes' identity losses are averaged in).
        triplet_weight: weight of the triplet loss (0 disables it).
        triplet_margin: hinge margin.
        triplet_metric: ``"euclidean"`` or ``"cosine"``.
        soft_margin: soft-margin triplet instead of the hinge.
        eval_every: evaluate every N epochs (and always after the last; 0 = only the last).
        eval_metric: ``"cosine"`` or ``"euclidean"`` retrieval distance.
        eval_flip: average the features of each image and its mirror.
        rerank: k-reciprocal re-ranking at evaluation.
        eval_batch_size: images per feature-extraction batch.
        amp: mixed precision autocast.
        amp_dtype: ``"auto"`` (bf16 on the CPU and on CUDA devices that support it, else
            fp16 with a gradient scaler), ``"bfloat16"`` or ``"float16"``.
        device: ``"auto"`` (``cuda:LOCAL_RANK`` when available, else CPU) or a device string.
        num_workers: DataLoader workers (default: the CPUs available, at most 4).
        seed: seeds the model initialisation and, with the epoch and rank, every epoch's
            sampling and augmentation (so a resumed run repeats an uninterrupted one).
        resume: continue from the newest complete checkpoint in ``out_dir/checkpoints``.
        max_steps_per_epoch: cap on steps per epoch (quick runs), ``None`` = full epochs.
        keep_checkpoints: complete checkpoints kept on disk.
    """

    out_dir: str = "runs/reid"
    dataset: str = "market1501"
    data_root: str = "data"
    model: ReidModelConfig = field(default_factory=_bot_model)
    init_checkpoint: str | None = None
    allow_partial: bool = False
    transform: ReidTransformConfig = field(default_factory=ReidTransformConfig)
    num_identities: int = 16
    num_instances: int = 4
    epochs: int = 120
    lr: float = 3.5e-4
    weight_decay: float = 5e-4
    warmup_epochs: int = 10
    warmup_factor: float = 0.01
    milestones: tuple[int, ...] = (40, 70)
    gamma: float = 0.1
    label_smoothing: float = 0.1
    id_weight: float = 1.0
    triplet_weight: float = 1.0
    triplet_margin: float = 0.3
    triplet_metric: DistanceMetric = "euclidean"
    soft_margin: bool = False
    eval_every: int = 10
    eval_metric: Literal["cosine", "euclidean"] = "cosine"
    eval_flip: bool = False
    rerank: bool = False
    eval_batch_size: int = 128
    amp: bool = False
    amp_dtype: Literal["auto", "bfloat16", "float16"] = "auto"
    device: str = "auto"
    num_workers: int = field(default_factory=default_num_workers)
    seed: int = 0
    resume: bool = False
    max_steps_per_epoch: int | None = None
    keep_checkpoints: int = 2

    def __post_init__(self) -> None:
        for name in ("num_identities", "num_instances", "epochs", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_instances < 2 and self.triplet_weight > 0:
            raise ValueError("the triplet loss needs num_instances >= 2 (positives in a batch)")
        for name in ("warmup_epochs", "eval_every", "num_workers", "id_weight", "triplet_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0 or not 0 < self.warmup_factor <= 1 or not 0 < self.gamma <= 1:
            raise ValueError("need lr > 0, 0 < warmup_factor <= 1 and 0 < gamma <= 1")
        if list(self.milestones) != sorted(self.milestones):
            raise ValueError(f"milestones must be increasing, got {self.milestones}")
        if self.id_weight == 0 and self.triplet_weight == 0:
            raise ValueError("id_weight and triplet_weight are both 0: nothing to train")
        if self.eval_metric not in ("cosine", "euclidean"):
            raise ValueError(
                f"eval_metric must be 'cosine' or 'euclidean', got {self.eval_metric!r}"
            )
        if self.amp_dtype not in ("auto", "bfloat16", "float16"):
            raise ValueError(f"amp_dtype must be auto, bfloat16 or float16, got {self.amp_dtype!r}")
        if self.max_steps_per_epoch is not None and self.max_steps_per_epoch < 1:
            raise ValueError(f"max_steps_per_epoch must be >= 1, got {self.max_steps_per_epoch}")
        if self.keep_checkpoints < 1:
            raise ValueError(f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}")

    @property
    def batch_size(self) -> int:
        """Images per step over all ranks (P × K)."""
        return self.num_identities * self.num_instances


def bot_lr_factor(epoch: int, cfg: TrainConfig) -> float:
    """LR multiplier at ``epoch`` (0-based): linear warm-up, then step decay."""
    factor = cfg.gamma ** bisect.bisect_right(cfg.milestones, epoch)
    if epoch < cfg.warmup_epochs:
        alpha = epoch / cfg.warmup_epochs
        factor *= cfg.warmup_factor * (1 - alpha) + alpha
    return factor
