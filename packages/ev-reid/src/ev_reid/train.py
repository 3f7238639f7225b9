"""Supervised re-id fine-tuning with the BoT recipe (Luo et al., CVPRW 2019).

Label-smoothed identity loss (ε 0.1) on the BNNeck logits + batch-hard triplet loss (margin
0.3) on the pooled feature, P×K identity-balanced batches (16 × 4), Adam (3.5e-4, weight decay
5e-4), linear warm-up over 10 epochs from 1% of the LR, ×0.1 at epochs 40 and 70, 120 epochs,
random erasing 0.5, last stride 1. The model starts from an UP-ReID checkpoint
(``backbone.safetensors`` of :func:`ev_reid.pretrain.pretrain_upreid`), an ImageNet/timm
checkpoint file, timm's pretrained weights, or scratch.

Outputs in ``out_dir``: ``config.json`` (the resolved :class:`TrainConfig` and environment),
``checkpoints/last.safetensors`` + ``last_state.pt`` (resume), ``model.safetensors`` (final
weights; the :class:`~ev_reid.models.ReidModelConfig` in the JSON beside it, so
:func:`~ev_reid.models.load_reid_model` rebuilds it) and ``metrics.json`` (per-epoch history
and the final evaluation).

Runs single-process or under ``torchrun`` (DDP): each of the W ranks takes ``P/W`` identities
× K images of every step (:class:`~ev_reid.data.DistributedRandomIdentitySampler`), gradients
are averaged by DDP, and rank 0 evaluates and writes the outputs.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ev_core.checkpoint import (
    load_checkpoint,
    load_torch_file,
    save_checkpoint,
    save_training_state,
)
from ev_core.distributed import (
    barrier,
    get_logger,
    get_rank,
    get_world_size,
    is_main_process,
)
from ev_core.io import write_json
from ev_core.progress import progress
from ev_core.repro import dump_run_config, seed_everything
from ev_reid.data.transforms import ReidTransformConfig
from ev_reid.losses import DistanceMetric, TripletLoss, label_smoothed_cross_entropy
from ev_reid.models.reid import ReidModel, ReidModelConfig, ReidOutput, load_backbone_weights
from ev_reid.records import ReidRecord

if TYPE_CHECKING:
    from ev_reid.datasets import ReidDataset
    from ev_reid.evaluation import RankResult
    from ev_reid.retrieval import IndexConfig, ReidIndex, SearchHit

__all__ = [
    "ReidCriterion",
    "TrainConfig",
    "TrainResult",
    "bot_lr_factor",
    "build_index",
    "checkpoint_transform",
    "evaluate_checkpoint",
    "evaluate_model",
    "extract_record_features",
    "resolve_device",
    "search_index",
    "train",
    "train_step",
]

_log = get_logger(__name__)


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
        amp_dtype: ``"auto"`` (bf16 on CPU, fp16 + GradScaler on CUDA), ``"bfloat16"`` or
            ``"float16"``.
        device: ``"auto"`` (``cuda:LOCAL_RANK`` when available, else CPU) or a device string.
        num_workers: DataLoader workers.
        seed: seeds the model initialisation and, with the epoch and rank, every epoch's
            sampling and augmentation (so a resumed run repeats an uninterrupted one).
        resume: continue from ``out_dir/checkpoints`` when a checkpoint exists.
        max_steps_per_epoch: cap on steps per epoch (quick runs), ``None`` = full epochs.
    """

    out_dir: str = "runs/reid"
    dataset: str = "market1501"
    data_root: str = "data"
    model: ReidModelConfig = field(default_factory=_bot_model)
    init_checkpoint: str | None = None
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
    num_workers: int = 4
    seed: int = 0
    resume: bool = False
    max_steps_per_epoch: int | None = None

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

    @property
    def batch_size(self) -> int:
        """Images per step over all ranks (P × K)."""
        return self.num_identities * self.num_instances


@dataclass
class TrainResult:
    """What :func:`train` returns.

    Attributes:
        model: the trained model (unwrapped from DDP, in eval mode).
        history: one record per epoch (losses, accuracy, lr, evaluation metrics when run).
        metrics: the final evaluation (``RankResult.as_dict()``), or ``None`` without a test
            split or on ranks other than 0.
        model_path: ``out_dir/model.safetensors`` (rank 0).
    """

    model: ReidModel
    history: list[dict[str, Any]]
    metrics: dict[str, Any] | None
    model_path: Path | None


def bot_lr_factor(epoch: int, cfg: TrainConfig) -> float:
    """LR multiplier at ``epoch`` (0-based): linear warm-up, then step decay."""
    factor = cfg.gamma ** bisect.bisect_right(cfg.milestones, epoch)
    if epoch < cfg.warmup_epochs:
        alpha = epoch / cfg.warmup_epochs
        factor *= cfg.warmup_factor * (1 - alpha) + alpha
    return factor


def resolve_device(device: str) -> torch.device:
    """``"auto"`` → ``cuda:LOCAL_RANK`` when CUDA is available, else the CPU."""
    if device != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        import os

        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def _upcast(t: torch.Tensor) -> torch.Tensor:
    """Losses run in float32 under autocast (float64 stays float64)."""
    return t if t.dtype == torch.float64 else t.float()


class ReidCriterion(nn.Module):
    """BoT loss: label-smoothed identity CE (+ mean over stripes) and batch-hard triplet.

    Args:
        label_smoothing: ε.
        id_weight: identity-loss weight.
        triplet_weight: triplet-loss weight.
        margin: triplet margin.
        metric: triplet distance.
        soft_margin: soft-margin triplet.
    """

    def __init__(
        self,
        *,
        label_smoothing: float = 0.1,
        id_weight: float = 1.0,
        triplet_weight: float = 1.0,
        margin: float = 0.3,
        metric: DistanceMetric = "euclidean",
        soft_margin: bool = False,
    ) -> None:
        super().__init__()
        self.label_smoothing = label_smoothing
        self.id_weight = id_weight
        self.triplet_weight = triplet_weight
        self.triplet = TripletLoss(margin, metric=metric, soft_margin=soft_margin)

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> ReidCriterion:
        """The criterion of a :class:`TrainConfig`."""
        return cls(
            label_smoothing=cfg.label_smoothing,
            id_weight=cfg.id_weight,
            triplet_weight=cfg.triplet_weight,
            margin=cfg.triplet_margin,
            metric=cfg.triplet_metric,
            soft_margin=cfg.soft_margin,
        )

    def forward(
        self, out: ReidOutput, pids: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Total loss and its (detached) parts for a training-mode model output.

        Args:
            out: the model's :class:`~ev_reid.models.ReidOutput`.
            pids: training identities ``[B]`` in ``[0, num_classes)``.

        Returns:
            ``(loss, logs)`` with ``logs`` holding ``id``, ``triplet`` and ``accuracy``.
        """
        logs: dict[str, torch.Tensor] = {}
        total = out.features.new_zeros(())
        if self.id_weight > 0:
            if out.logits is None:
                raise ValueError("the identity loss needs a classifier: set num_classes > 0")
            id_loss = label_smoothed_cross_entropy(_upcast(out.logits), pids, self.label_smoothing)
            if out.part_logits is not None:
                parts = [
                    label_smoothed_cross_entropy(
                        _upcast(out.part_logits[:, i]), pids, self.label_smoothing
                    )
                    for i in range(out.part_logits.shape[1])
                ]
                id_loss = (id_loss + torch.stack(parts).sum()) / (1 + len(parts))
            total = total + self.id_weight * id_loss
            logs["id"] = id_loss.detach()
            logs["accuracy"] = (out.logits.argmax(dim=1) == pids).float().mean().detach()
        if self.triplet_weight > 0:
            tri = self.triplet(_upcast(out.features), pids)
            total = total + self.triplet_weight * tri
            logs["triplet"] = tri.detach()
        logs["loss"] = total.detach()
        return total, logs


def train_step(
    model: nn.Module,
    criterion: ReidCriterion,
    images: torch.Tensor,
    pids: torch.Tensor,
    *,
    autocast: contextlib.AbstractContextManager[Any] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Forward and loss of one batch (no backward, no optimizer step).

    Args:
        model: a training-mode :class:`~ev_reid.models.ReidModel` (possibly DDP-wrapped).
        criterion: the loss.
        images: ``[B, 3, H, W]``.
        pids: ``[B]``.
        autocast: optional autocast context for the forward.

    Returns:
        ``(loss, logs)`` as :meth:`ReidCriterion.forward`.
    """
    with autocast if autocast is not None else contextlib.nullcontext():
        out = model(images)
    if not isinstance(out, ReidOutput):
        raise TypeError("train_step needs the model in training mode (it returned features)")
    return criterion(out, pids)


def _epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return (seed * 1_000_003 + epoch * 7919 + rank) % 2**32


@torch.no_grad()
def extract_record_features(
    model: nn.Module,
    records: Sequence[ReidRecord],
    *,
    transform: ReidTransformConfig | None = None,
    flip: bool = False,
    batch_size: int = 128,
    num_workers: int = 0,
    device: torch.device | str = "cpu",
    desc: str = "extract features",
) -> torch.Tensor:
    """Evaluation features of the images of ``records`` (test transform, eval mode).

    Args:
        model: maps images ``[B, 3, H, W]`` to features ``[B, D]`` in eval mode.
        records: the images.
        transform: size/normalisation of the test transform (default BoT's 256×128).
        flip: average each image's features with its mirror's.
        batch_size: images per batch.
        num_workers: DataLoader workers.
        device: where the model runs.
        desc: progress-bar label.

    Returns:
        ``[len(records), D]`` float32 features on the CPU.
    """
    from torch.utils.data import DataLoader

    from ev_reid.data.transforms import build_test_transform
    from ev_reid.datasets import ImageDataset
    from ev_reid.evaluation import extract_features

    loader = DataLoader(
        ImageDataset(records, build_test_transform(transform)),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
    )
    return extract_features(model, loader, flip=flip, device=device, desc=desc)


def evaluate_model(
    model: nn.Module,
    query: Sequence[ReidRecord],
    gallery: Sequence[ReidRecord],
    *,
    transform: ReidTransformConfig | None = None,
    metric: str = "cosine",
    flip: bool = False,
    rerank: bool = False,
    batch_size: int = 128,
    num_workers: int = 0,
    device: torch.device | str = "cpu",
    use_metric_cuhk03: bool = False,
) -> RankResult:
    """Extract query/gallery features with ``model`` and compute CMC/mAP/mINP.

    Args:
        model: a :class:`~ev_reid.models.ReidModel` (evaluated in eval mode, mode restored).
        query: query records.
        gallery: gallery records.
        transform: the size/normalisation (test transform) to use.
        metric: ``"cosine"`` or ``"euclidean"``.
        flip: average each image's features with its mirror's.
        rerank: k-reciprocal re-ranking.
        batch_size: images per extraction batch.
        num_workers: DataLoader workers.
        device: where the model runs.
        use_metric_cuhk03: CUHK03's classic single-gallery-shot CMC instead of the Market
            protocol (pass ``dataset.use_metric_cuhk03``).

    Returns:
        The :class:`~ev_reid.evaluation.RankResult`.
    """
    from ev_reid.evaluation import evaluate_features

    kw: dict[str, Any] = dict(
        transform=transform,
        flip=flip,
        batch_size=batch_size,
        num_workers=num_workers,
        device=device,
    )
    qf = extract_record_features(model, query, desc="query features", **kw)
    gf = extract_record_features(model, gallery, desc="gallery features", **kw)
    return evaluate_features(
        qf,
        gf,
        [r.pid for r in query],
        [r.pid for r in gallery],
        [r.camid for r in query],
        [r.camid for r in gallery],
        metric=metric,
        rerank=rerank,
        use_metric_cuhk03=use_metric_cuhk03,
    )


def evaluate_checkpoint(
    checkpoint: str | Path,
    dataset: ReidDataset,
    *,
    metric: str = "cosine",
    flip: bool = False,
    rerank: bool = False,
    batch_size: int = 128,
    num_workers: int = 0,
    device: str = "auto",
) -> RankResult:
    """Evaluate a ``model.safetensors`` written by :func:`train` on ``dataset``'s query/gallery.

    The image size and normalisation are those the model was trained with (stored beside
    the weights), else :class:`~ev_reid.data.ReidTransformConfig`'s defaults.

    Raises:
        ValueError: if the dataset has no query or gallery split.
    """
    from ev_reid.models.reid import load_reid_model

    if not dataset.query or not dataset.gallery:
        raise ValueError(f"{dataset.name}: evaluation needs query and gallery images")
    dev = resolve_device(device)
    model = load_reid_model(checkpoint, map_location=dev)
    return evaluate_model(
        model,
        dataset.query,
        dataset.gallery,
        transform=checkpoint_transform(checkpoint),
        metric=metric,
        flip=flip,
        rerank=rerank,
        batch_size=batch_size,
        num_workers=num_workers,
        device=dev,
        use_metric_cuhk03=dataset.use_metric_cuhk03,
    )


def checkpoint_transform(checkpoint: str | Path) -> ReidTransformConfig:
    """The transform settings stored beside a trained model (defaults when absent)."""
    from ev_core.checkpoint import config_path_for

    meta_file = config_path_for(checkpoint)
    if meta_file.is_file():
        import json

        tf = json.loads(meta_file.read_text(encoding="utf-8")).get("metadata", {}).get("transform")
        if isinstance(tf, dict):
            fields: dict[str, Any] = {
                k: tuple(v) if isinstance(v, list) else v for k, v in tf.items()
            }
            return ReidTransformConfig(**fields)
    return ReidTransformConfig()


def build_index(
    checkpoint: str | Path,
    records: Sequence[ReidRecord],
    out_dir: str | Path,
    *,
    config: IndexConfig | None = None,
    flip: bool = False,
    batch_size: int = 128,
    num_workers: int = 0,
    device: str = "auto",
) -> ReidIndex:
    """Index the images of ``records`` with a trained model and save the index to ``out_dir``.

    Besides the index files (:meth:`~ev_reid.retrieval.ReidIndex.save`), ``out_dir`` gets
    ``model.json`` naming the checkpoint and the feature settings, so that
    :func:`search_index` embeds queries the same way.

    Returns:
        The built :class:`~ev_reid.retrieval.ReidIndex`.
    """
    from ev_reid.models.reid import load_reid_model
    from ev_reid.retrieval import ReidIndex

    dev = resolve_device(device)
    model = load_reid_model(checkpoint, map_location=dev)
    feats = extract_record_features(
        model,
        records,
        transform=checkpoint_transform(checkpoint),
        flip=flip,
        batch_size=batch_size,
        num_workers=num_workers,
        device=dev,
        desc="index features",
    )
    index = ReidIndex.build(feats, records, config)
    out = index.save(out_dir)
    write_json(out / "model.json", {"checkpoint": str(Path(checkpoint).resolve()), "flip": flip})
    return index


def search_index(
    index_dir: str | Path,
    queries: Sequence[ReidRecord],
    k: int = 10,
    *,
    checkpoint: str | Path | None = None,
    batch_size: int = 128,
    num_workers: int = 0,
    device: str = "auto",
) -> list[list[SearchHit]]:
    """Ranked gallery records for each query image, from an index built by :func:`build_index`.

    Args:
        index_dir: the saved index.
        queries: the query images (pids/camids are not used).
        k: results per query.
        checkpoint: the model embedding the queries (default: the one in ``model.json``).
        batch_size: images per batch.
        num_workers: DataLoader workers.
        device: where the model runs.

    Returns:
        ``hits[q][r]``: the ``r``-th best :class:`~ev_reid.retrieval.SearchHit` of query ``q``.
    """
    import json

    from ev_reid.models.reid import load_reid_model
    from ev_reid.retrieval import ReidIndex

    src = Path(index_dir)
    info: dict[str, Any] = {}
    if (src / "model.json").is_file():
        info = json.loads((src / "model.json").read_text(encoding="utf-8"))
    ckpt = checkpoint if checkpoint is not None else info.get("checkpoint")
    if ckpt is None:
        raise ValueError(f"{src} has no model.json: pass the model checkpoint")
    dev = resolve_device(device)
    model = load_reid_model(ckpt, map_location=dev)
    feats = extract_record_features(
        model,
        queries,
        transform=checkpoint_transform(ckpt),
        flip=bool(info.get("flip", False)),
        batch_size=batch_size,
        num_workers=num_workers,
        device=dev,
        desc="query features",
    )
    index = ReidIndex.load(src)
    return index.search(feats, min(k, len(index)))


def _build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _load_dataset(cfg: TrainConfig) -> ReidDataset:
    from ev_reid.datasets import create

    return create(cfg.dataset, cfg.data_root)


def train(
    cfg: TrainConfig,
    dataset: ReidDataset | None = None,
    *,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Fine-tune a re-id model (see the module docstring).

    Call :func:`ev_core.distributed.init_distributed` first for DDP (``torchrun``).

    Args:
        cfg: the run configuration.
        dataset: the dataset (default ``create(cfg.dataset, cfg.data_root)``); its ``train``
            pids must be ``0..N-1``; ``query``/``gallery`` are used for evaluation when present.
        on_epoch: called with each epoch's record (rank 0).

    Returns:
        :class:`TrainResult`.
    """
    from torch.utils.data import DataLoader

    from ev_reid.data.sampler import DistributedRandomIdentitySampler, RandomIdentitySampler
    from ev_reid.data.transforms import build_train_transform
    from ev_reid.datasets import ImageDataset

    world, rank = get_world_size(), get_rank()
    if cfg.num_identities % world:
        raise ValueError(
            f"num_identities ({cfg.num_identities}) must be divisible by the world size ({world})"
        )
    device = resolve_device(cfg.device)
    ds = dataset if dataset is not None else _load_dataset(cfg)
    if not ds.train:
        raise ValueError(f"{ds.name}: the training split is empty")
    num_classes = len({r.pid for r in ds.train})
    model_cfg = dataclasses.replace(cfg.model, num_classes=num_classes)
    cfg = dataclasses.replace(cfg, model=model_cfg)
    out_dir = Path(cfg.out_dir)
    ckpt_dir = out_dir / "checkpoints"

    seed_everything(cfg.seed)
    model = ReidModel(model_cfg)
    if cfg.init_checkpoint is not None:
        report = load_backbone_weights(model, cfg.init_checkpoint)
        _log.info(
            "initialised %d backbone tensors from %s (%d missing, %d unexpected, %d mismatched)",
            len(report.loaded), cfg.init_checkpoint, len(report.missing),
            len(report.unexpected), len(report.mismatched),
        )  # fmt: skip
    model.to(device)
    optimizer = _build_optimizer(model, cfg)
    amp_dtype = (
        (torch.float16 if device.type == "cuda" else torch.bfloat16)
        if cfg.amp_dtype == "auto"
        else getattr(torch, cfg.amp_dtype)
    )
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp and amp_dtype == torch.float16)

    start_epoch, history = 0, []
    if cfg.resume and (ckpt_dir / "last.safetensors").is_file():
        state, info = load_checkpoint(ckpt_dir / "last.safetensors", map_location=str(device))
        training = load_torch_file(ckpt_dir / "last_state.pt", map_location=str(device))
        if info.get("metadata", {}).get("epoch") != training["epoch"]:
            raise RuntimeError(f"{ckpt_dir}: last.safetensors and last_state.pt do not match")
        model.load_state_dict(state)
        optimizer.load_state_dict(training["optimizer"])
        scaler.load_state_dict(training["scaler"])
        start_epoch, history = int(training["epoch"]), list(training["history"])
        _log.info("resumed from %s at epoch %d", ckpt_dir, start_epoch)
    if is_main_process():
        dump_run_config({"train": cfg, "world_size": world}, out_dir)

    net: nn.Module = model
    if world > 1:
        ids = [device.index] if device.type == "cuda" else None
        net = DistributedDataParallel(model, device_ids=ids)
    sampler: RandomIdentitySampler
    per_rank = (cfg.num_identities // world) * cfg.num_instances
    if world > 1:
        sampler = DistributedRandomIdentitySampler(
            ds.train, per_rank, cfg.num_instances, seed=cfg.seed
        )
    else:
        sampler = RandomIdentitySampler(ds.train, per_rank, cfg.num_instances, seed=cfg.seed)
    generator = torch.Generator()
    loader = DataLoader(
        ImageDataset(ds.train, build_train_transform(cfg.transform)),
        batch_size=per_rank,
        sampler=sampler,
        num_workers=cfg.num_workers,
        drop_last=True,
        generator=generator,
    )
    if len(loader) == 0:
        raise ValueError(f"{ds.name}: the training split does not fill one P×K batch")
    criterion = ReidCriterion.from_config(cfg)
    autocast = torch.autocast(device.type, dtype=amp_dtype, enabled=cfg.amp)
    has_test = bool(ds.query) and bool(ds.gallery)

    metrics: dict[str, Any] | None = None
    for epoch in range(start_epoch, cfg.epochs):
        epoch_seed = _epoch_seed(cfg.seed, epoch, rank)
        seed_everything(epoch_seed)
        generator.manual_seed(epoch_seed)
        sampler.set_epoch(epoch)
        lr = cfg.lr * bot_lr_factor(epoch, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        model.train()
        sums: dict[str, torch.Tensor] = {}
        steps = (
            len(loader)
            if cfg.max_steps_per_epoch is None
            else min(len(loader), cfg.max_steps_per_epoch)
        )
        bar = progress(loader, desc=f"train {epoch + 1}/{cfg.epochs}", total=steps)
        for step, (images, pids, _camids, _idx) in enumerate(bar):
            if step >= steps:
                break
            images, pids = images.to(device, non_blocking=True), pids.to(device)
            loss, logs = train_step(net, criterion, images, pids, autocast=autocast)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            for k, v in logs.items():
                sums[k] = sums[k] + v if k in sums else v.clone()
            bar.set_postfix(loss=f"{float(logs['loss']):.3f}")
        bar.close()
        keys = sorted(sums)
        values = torch.stack([sums[k] for k in keys]).float() / steps
        if world > 1:
            torch.distributed.all_reduce(values)
            values /= world
        record: dict[str, Any] = {"epoch": epoch + 1, "lr": lr, "steps": steps}
        record.update({k: float(v) for k, v in zip(keys, values.tolist())})
        last = epoch + 1 == cfg.epochs
        due = cfg.eval_every > 0 and (epoch + 1) % cfg.eval_every == 0
        if has_test and (last or due) and is_main_process():
            result = evaluate_model(
                model,
                ds.query,
                ds.gallery,
                transform=cfg.transform,
                metric=cfg.eval_metric,
                flip=cfg.eval_flip,
                rerank=cfg.rerank,
                batch_size=cfg.eval_batch_size,
                num_workers=cfg.num_workers,
                device=device,
                use_metric_cuhk03=ds.use_metric_cuhk03,
            )
            metrics = result.as_dict()
            record["eval"] = metrics
            _log.info("epoch %d: %s", epoch + 1, result)
        history.append(record)
        if on_epoch is not None and is_main_process():
            on_epoch(record)
        if is_main_process():
            save_checkpoint(
                ckpt_dir / "last.safetensors",
                model.state_dict(),
                config=model_cfg,
                metadata={"epoch": epoch + 1},
            )
            save_training_state(
                ckpt_dir / "last_state.pt",
                {
                    "epoch": epoch + 1,
                    "optimizer": optimizer.state_dict(),
                    "scaler": scaler.state_dict(),
                    "history": history,
                },
            )
        barrier()

    model.eval()
    model_path = None
    if is_main_process():
        model_path = save_checkpoint(
            out_dir / "model.safetensors",
            model.state_dict(),
            config=model_cfg,
            metadata={
                "epochs": cfg.epochs,
                "metrics": metrics,
                "dataset": ds.name,
                "transform": cfg.transform,
            },
        )
        write_json(out_dir / "metrics.json", {"history": history, "final": metrics})
    barrier()
    return TrainResult(model, history, metrics, model_path)
