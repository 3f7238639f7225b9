"""UP-ReID unsupervised pre-training on ev-core's contrastive core (SYSTEMS.md §3.1).

The recommended design, on :class:`ev_core.ssl.ContrastiveTrainer`:

* **instance contrast**: MoCo-v2 (momentum encoder, queue, τ 0.2; or SimCLR) on two augmented
  views, with InfoNCE or MACL;
* **global consistency** (weight 1): ``L_g = mean over views v of (1 − cos(q_v, sg(k_orig)))``
  where ``q_v`` is the online embedding of view ``v`` and ``k_orig`` the target-encoder
  (momentum encoder under MoCo) embedding of the *original* image (resize + flip only);
* **intrinsic local contrast** (weight 0.5): the backbone's feature map is cut into 3
  horizontal stripes, each average-pooled and projected by a shared MLP head to 128-d; InfoNCE
  (τ 0.2) or MACL treats stripe ``s`` of image ``i`` in the other view as the positive and, by
  default, every other stripe (of the same and of other images, both views) as negatives;
  ``local_negatives="image"`` keeps only the same image's other stripes
  (:func:`ev_reid.losses.local_stripe_contrast`). The views use only flips and
  aspect-preserving crops (:func:`ev_reid.data.build_pretrain_views`), so stripe ``s`` covers
  the same body part in both.

``pretrain_upreid(cfg)`` runs it on unlabelled images (a dataset's records with pids ignored,
or a folder of images) and writes ``backbone.safetensors`` (keys ``backbone.*``), which
:func:`ev_reid.train.train` and :func:`ev_reid.models.load_backbone_weights` accept.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ev_core.checkpoint import save_checkpoint
from ev_core.distributed import get_logger, get_world_size, is_main_process
from ev_core.ssl import ContrastiveEncoder, LossTermSpec, PretrainConfig, pretrain
from ev_reid.data.transforms import PretrainViewConfig, build_pretrain_views

# the I² losses live in ev_reid.losses and the adapters in ev_reid.models; the two loss
# functions stay importable from here for code written against the earlier layout
from ev_reid.losses.upreid import (
    GlobalConsistencyTerm,
    LocalNegatives,
    LocalStripeContrastTerm,
    global_consistency_loss,  # noqa: F401
    local_stripe_contrast,  # noqa: F401
)
from ev_reid.models.adapters import FeatureMapBackbone, StripeProjection
from ev_reid.models.reid import create_backbone
from ev_reid.records import ReidRecord

__all__ = [
    "UPReIDConfig",
    "UPReIDResult",
    "build_upreid_encoder",
    "default_upreid_ssl_config",
    "pretrain_upreid",
    "unlabelled_records",
]

_log = get_logger(__name__)


# ----------------------------------------------------------------------------------------
# encoder
# ----------------------------------------------------------------------------------------
def build_upreid_encoder(
    backbone: str,
    *,
    backbone_kwargs: dict[str, Any] | None = None,
    pretrained: bool = False,
    last_stride_1: bool = False,
    num_stripes: int = 3,
    proj_hidden_dim: int = 2048,
    proj_dim: int = 128,
    local_head: bool = True,
) -> ContrastiveEncoder:
    """The UP-ReID encoder: backbone → GAP → MLP (global) and, optionally, the stripe head.

    Args:
        backbone: timm / ev-core model name (as :class:`~ev_reid.models.ReidModelConfig`).
        backbone_kwargs: extra ``timm.create_model`` arguments.
        pretrained: start from timm's pretrained weights.
        last_stride_1: ResNet last stride 1 (finer stripes).
        num_stripes: stripes of the local head.
        proj_hidden_dim: hidden width of both projection MLPs.
        proj_dim: embedding dimension of both heads.
        local_head: build the stripe head (off when the local term is ablated).
    """
    body, channels = create_backbone(
        backbone, pretrained=pretrained, last_stride_1=last_stride_1, **(backbone_kwargs or {})
    )
    heads = (
        {"stripes": StripeProjection(channels, num_stripes, proj_hidden_dim, proj_dim)}
        if local_head
        else None
    )
    return ContrastiveEncoder(
        FeatureMapBackbone(body, channels),
        feature_dim=channels,
        proj_hidden_dim=proj_hidden_dim,
        proj_dim=proj_dim,
        extra_heads=heads,
    )


# ----------------------------------------------------------------------------------------
# configuration and entry point
# ----------------------------------------------------------------------------------------
def default_upreid_ssl_config() -> PretrainConfig:
    """MoCo-v2 settings of the recommended design (τ 0.2, queue 65,536, m 0.999, SGD 0.3/256)."""
    return PretrainConfig(
        method="moco",
        loss="infonce",
        temperature=0.2,
        queue_size=65536,
        momentum=0.999,
        epochs=200,
        optimizer="sgd",
        lr=0.3,
        lr_scaling="linear",
        weight_decay=1e-4,
        lr_schedule="cosine",
    )


@dataclass
class UPReIDConfig:
    """Every setting of a UP-ReID pre-training run (dumped beside its outputs).

    Attributes:
        out_dir: output folder (``config.json``, ``metrics.jsonl``, ``checkpoints/``,
            ``encoder.safetensors`` and ``backbone.safetensors``).
        dataset: dataset name for :func:`ev_reid.datasets.create` (pids are ignored), used
            when ``image_dir`` is not set.
        data_root: the dataset's root folder.
        splits: which of the dataset's splits to use as unlabelled images.
        image_dir: a folder of unlabelled images (searched recursively); overrides
            ``dataset``.
        backbone: timm / ev-core model name.
        backbone_kwargs: extra ``timm.create_model`` arguments.
        pretrained: start from timm's pretrained weights.
        last_stride_1: ResNet last stride 1.
        proj_hidden_dim: hidden width of the projection MLPs.
        proj_dim: embedding dimension (UP-ReID: 128).
        global_term: use the global-consistency term (ablation switch).
        global_weight: its weight (UP-ReID: 1).
        local_term: use the intrinsic local stripe contrast (ablation switch).
        local_weight: its weight (UP-ReID: 0.5).
        local_temperature: its τ (UP-ReID: 0.2).
        local_negatives: ``"batch"`` (every other stripe of the batch) or ``"image"`` (only
            the same image's other stripes), see :mod:`ev_reid.losses.upreid`.
        views: the view augmentation (size, stripe-safe crop scale, number of stripes S).
        ssl: the contrastive core's settings (method, instance loss ``infonce``/``macl``,
            τ, queue, momentum, optimizer, epochs, AMP, resume ...). ``ssl.out_dir`` is set
            from ``out_dir``; ``ssl.loss`` also selects the local term's loss.
        batch_size: images per step and rank.
        num_workers: DataLoader workers.
    """

    out_dir: str = "runs/upreid"
    dataset: str = "market1501"
    data_root: str = "data"
    splits: tuple[str, ...] = ("train",)
    image_dir: str | None = None
    backbone: str = "resnet50"
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    pretrained: bool = False
    last_stride_1: bool = False
    proj_hidden_dim: int = 2048
    proj_dim: int = 128
    global_term: bool = True
    global_weight: float = 1.0
    local_term: bool = True
    local_weight: float = 0.5
    local_temperature: float = 0.2
    local_negatives: LocalNegatives = "batch"
    views: PretrainViewConfig = field(default_factory=PretrainViewConfig)
    ssl: PretrainConfig = field(default_factory=default_upreid_ssl_config)
    batch_size: int = 256
    num_workers: int = 4

    def __post_init__(self) -> None:
        bad = sorted(set(self.splits) - {"train", "query", "gallery"})
        if bad or not self.splits:
            raise ValueError(
                f"splits must be a non-empty subset of train/query/gallery, got {self.splits}"
            )
        if self.batch_size < 2:
            raise ValueError(
                f"batch_size must be >= 2 (contrastive negatives), got {self.batch_size}"
            )
        for name in ("global_weight", "local_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.local_negatives not in ("batch", "image"):
            raise ValueError(
                f"local_negatives must be 'batch' or 'image', got {self.local_negatives!r}"
            )
        if self.local_negatives == "image" and self.views.num_stripes < 2:
            raise ValueError("local_negatives='image' needs views.num_stripes >= 2")
        if not self.local_temperature > 0:
            raise ValueError(f"local_temperature must be > 0, got {self.local_temperature}")


@dataclass
class UPReIDResult:
    """What :func:`pretrain_upreid` returns.

    Attributes:
        backbone_path: ``backbone.safetensors`` (``backbone.*`` keys, for fine-tuning), or
            ``None`` on ranks other than 0 / when the run stopped early.
        encoder_path: the contrastive core's ``encoder.safetensors`` (backbone + heads).
        history: logged records (loss, instance, global, local, τ, alignment, lr, ...).
        steps: optimizer steps done.
        num_images: unlabelled images used.
    """

    backbone_path: Path | None
    encoder_path: Path | None
    history: list[dict[str, float]]
    steps: int
    num_images: int


def unlabelled_records(image_dir: str | os.PathLike[str]) -> list[ReidRecord]:
    """Every image under ``image_dir`` (recursively, sorted) as a record with pid ``-1``.

    Raises:
        DatasetLayoutError: if the folder is missing or holds no image.
    """
    from ev_reid.datasets.base import IMAGE_EXTENSIONS, DatasetLayoutError

    root = Path(image_dir).expanduser()
    layout = "<image_dir>/**/<image>.jpg|png|...  (unlabelled person crops, any sub-folders)"
    if not root.is_dir():
        raise DatasetLayoutError("missing folder", path=root, expected=layout)
    files = sorted(
        p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
    )
    if not files:
        raise DatasetLayoutError("folder holds no image", path=root, expected=layout)
    return [ReidRecord(str(p), -1, 0) for p in files]


def _records_for(cfg: UPReIDConfig) -> list[ReidRecord]:
    if cfg.image_dir is not None:
        return unlabelled_records(cfg.image_dir)
    from ev_reid.datasets import create

    ds = create(cfg.dataset, cfg.data_root)
    records = [r for split in cfg.splits for r in getattr(ds, split)]
    if not records:
        raise ValueError(f"{cfg.dataset} at {cfg.data_root}: splits {cfg.splits} hold no image")
    return records


def _loss_terms(cfg: UPReIDConfig) -> list[LossTermSpec]:
    terms = []
    if cfg.global_term and cfg.global_weight > 0:
        terms.append(LossTermSpec("global", GlobalConsistencyTerm(), cfg.global_weight))
    if cfg.local_term and cfg.local_weight > 0:
        local = LocalStripeContrastTerm(
            loss=cfg.ssl.loss,
            temperature=cfg.local_temperature,
            macl_alpha=cfg.ssl.macl_alpha,
            macl_a0=cfg.ssl.macl_a0,
            negatives=cfg.local_negatives,
        )
        terms.append(LossTermSpec("local", local, cfg.local_weight))
    return terms


def pretrain_upreid(
    cfg: UPReIDConfig,
    records: Sequence[ReidRecord] | None = None,
    *,
    on_log: Callable[[dict[str, float]], None] | None = None,
) -> UPReIDResult:
    """Run UP-ReID pre-training (single process, or DDP under ``torchrun``).

    Call :func:`ev_core.distributed.init_distributed` first for DDP: each rank then loads a
    ``DistributedSampler`` shard of ``batch_size`` images per step.

    Args:
        cfg: the run configuration.
        records: the unlabelled images (pids ignored); default from ``cfg.image_dir`` or
            ``cfg.dataset``.
        on_log: called with every logged record (rank 0).

    Returns:
        :class:`UPReIDResult`.

    Raises:
        ValueError: with fewer images than one batch, or an inconsistent configuration.
    """
    from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

    from ev_reid.datasets import ImageDataset

    records = list(records) if records is not None else _records_for(cfg)
    world = get_world_size()
    if len(records) < cfg.batch_size * world:
        raise ValueError(
            f"{len(records)} images are fewer than one batch ({cfg.batch_size} × {world} ranks)"
        )
    ssl_cfg = dataclasses.replace(cfg.ssl, out_dir=cfg.out_dir)
    generator = torch.Generator()
    generator.manual_seed(ssl_cfg.seed if ssl_cfg.seed is not None else 0)
    dataset = ImageDataset(records, build_pretrain_views(cfg.views))
    sampler: Any = (
        DistributedSampler(dataset, shuffle=True, seed=ssl_cfg.seed or 0, drop_last=True)
        if world > 1
        else RandomSampler(dataset, generator=generator)
    )
    loader = DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        sampler=sampler,
        num_workers=cfg.num_workers,
        drop_last=True,  # equal batches: BatchNorm and cross-rank negatives
        persistent_workers=False,  # exact resume: worker RNG is re-seeded every epoch
        generator=generator,
    )
    terms = _loss_terms(cfg)
    if ssl_cfg.seed is not None:  # same initial weights on every rank and run
        torch.manual_seed(ssl_cfg.seed)
    encoder = build_upreid_encoder(
        cfg.backbone,
        backbone_kwargs=cfg.backbone_kwargs,
        pretrained=cfg.pretrained,
        last_stride_1=cfg.last_stride_1,
        num_stripes=cfg.views.num_stripes,
        proj_hidden_dim=cfg.proj_hidden_dim,
        proj_dim=cfg.proj_dim,
        local_head=any(t.name == "local" for t in terms),
    )
    _log.info(
        "UP-ReID pre-training on %d images: %s + %s", len(records), ssl_cfg.method,
        ", ".join(f"{t.name}×{t.weight}" for t in terms) or "no I² terms",
    )  # fmt: skip
    result = pretrain(encoder, loader, ssl_cfg, loss_terms=terms, on_log=on_log)
    backbone_path = None
    if result.finished and is_main_process():
        adapter = encoder.backbone
        assert isinstance(adapter, FeatureMapBackbone)
        body = adapter.body
        backbone_path = save_checkpoint(
            Path(cfg.out_dir) / "backbone.safetensors",
            {f"backbone.{k}": v for k, v in body.state_dict().items()},
            config={"upreid": cfg},
            metadata={"step": result.step, "epoch": result.epoch, "num_images": len(records)},
        )
    return UPReIDResult(
        backbone_path, result.encoder_path, result.history, result.step, len(records)
    )
