"""UP-ReID unsupervised pre-training on ev-core's contrastive core (SYSTEMS.md §3.1).

The recommended design, on :class:`ev_core.ssl.ContrastiveTrainer`:

* **instance contrast**: MoCo-v2 (momentum encoder, queue, τ 0.2; or SimCLR) on two augmented
  views, with InfoNCE or MACL;
* **global consistency** (weight 1): ``L_g = mean over views v of (1 − cos(q_v, sg(k_orig)))``
  where ``q_v`` is the online embedding of view ``v`` and ``k_orig`` the target-encoder
  (momentum encoder under MoCo) embedding of the *original* image (resize + flip only);
* **intrinsic local contrast** (weight 0.5): the backbone's feature map is cut into 3
  horizontal stripes, each average-pooled and projected by a shared MLP head to 128-d; InfoNCE
  (τ 0.2) or MACL treats stripe ``s`` of image ``i`` in the other view as the positive and every
  other stripe (of the same and of other images, both views) as negatives. The views use
  only flips and aspect-preserving crops (:func:`ev_reid.data.build_pretrain_views`), so
  stripe ``s`` covers the same body part in both.

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
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ev_core.checkpoint import save_checkpoint
from ev_core.distributed import get_logger, get_world_size, is_main_process
from ev_core.losses import info_nce_loss, macl_loss
from ev_core.losses.contrastive import ContrastiveOutput
from ev_core.ssl import (
    ContrastiveEncoder,
    EncoderOutput,
    LossTermSpec,
    PretrainConfig,
    ProjectionHead,
    StepContext,
    pretrain,
)
from ev_reid.data.transforms import PretrainViewConfig, build_pretrain_views
from ev_reid.models.pooling import stripe_pool
from ev_reid.models.reid import create_backbone
from ev_reid.records import ReidRecord

__all__ = [
    "FeatureMapBackbone",
    "GlobalConsistencyTerm",
    "LocalStripeContrastTerm",
    "StripeProjection",
    "UPReIDConfig",
    "UPReIDResult",
    "build_upreid_encoder",
    "default_upreid_ssl_config",
    "global_consistency_loss",
    "local_stripe_contrast",
    "pretrain_upreid",
    "unlabelled_records",
]

_log = get_logger(__name__)
ContrastiveKind = Literal["infonce", "macl"]


# ----------------------------------------------------------------------------------------
# the I² loss terms (functional)
# ----------------------------------------------------------------------------------------
def global_consistency_loss(
    queries: Sequence[torch.Tensor], key_original: torch.Tensor
) -> torch.Tensor:
    """UP-ReID's global consistency ``mean_v (1 − cos(q_v, sg(k_orig)))``, averaged over the batch.

    Args:
        queries: one ``[B, D]`` online embedding per augmented view.
        key_original: ``[B, D]`` target embedding of the original images (detached here).

    Returns:
        Scalar loss in ``[0, 2]``, computed in float32 (float64 stays float64).
    """
    if not queries:
        raise ValueError("global_consistency_loss needs at least one view")
    dtype = torch.float64 if key_original.dtype == torch.float64 else torch.float32
    k = F.normalize(key_original.detach().to(dtype), dim=1)
    terms = []
    for q in queries:
        if q.shape != key_original.shape:
            raise ValueError(
                f"view embedding {tuple(q.shape)} and original {tuple(key_original.shape)} differ"
            )
        cos = (F.normalize(q.to(dtype), dim=1) * k).sum(dim=1)
        terms.append((1.0 - cos).mean())
    return torch.stack(terms).mean()


def local_stripe_contrast(
    stripes1: torch.Tensor,
    stripes2: torch.Tensor,
    *,
    loss: ContrastiveKind = "infonce",
    temperature: float = 0.2,
    macl_alpha: float = 0.5,
    macl_a0: float = 0.0,
    gather_distributed: bool = False,
) -> ContrastiveOutput:
    """UP-ReID's intrinsic local contrast among horizontal stripes.

    The ``B·S`` stripe embeddings of each view are flattened (image-major) and contrasted in
    SimCLR's symmetric arrangement: stripe ``s`` of image ``i`` in one view has the same stripe
    of the same image in the other view as its positive and all other ``2·B·S − 2`` stripe
    embeddings (other stripes of the same image, every stripe of other images, both views) as
    negatives.

    Args:
        stripes1: ``[B, S, D]`` stripe embeddings of view 1.
        stripes2: ``[B, S, D]`` stripe embeddings of view 2.
        loss: ``"infonce"`` (temperature τ) or ``"macl"`` (τ0 = ``temperature``).
        temperature: τ (UP-ReID: 0.2).
        macl_alpha: MACL's α.
        macl_a0: MACL's A0.
        gather_distributed: take negatives from every DDP rank.

    Returns:
        The :class:`~ev_core.losses.ContrastiveOutput` (loss, τ, alignment, accuracy).
    """
    if stripes1.ndim != 3 or stripes1.shape != stripes2.shape:
        raise ValueError(
            f"stripe embeddings must both be [B, S, D], got {tuple(stripes1.shape)} and "
            f"{tuple(stripes2.shape)}"
        )
    z1, z2 = stripes1.flatten(0, 1), stripes2.flatten(0, 1)
    if loss == "macl":
        return macl_loss(
            z1,
            z2,
            tau0=temperature,
            alpha=macl_alpha,
            a0=macl_a0,
            gather_distributed=gather_distributed,
        )
    if loss == "infonce":
        return info_nce_loss(z1, z2, temperature=temperature, gather_distributed=gather_distributed)
    raise ValueError(f"loss must be 'infonce' or 'macl', got {loss!r}")


@dataclass
class GlobalConsistencyTerm:
    """:class:`ev_core.ssl.LossTerm` computing :func:`global_consistency_loss` from a step.

    Uses the online embeddings of both views and the trainer's target-encoder embedding of
    the original images (``ctx.original``; the momentum encoder under MoCo).
    """

    def __call__(self, ctx: StepContext) -> torch.Tensor:
        if ctx.original is None:
            raise ValueError(
                "the global consistency term needs the original images: load data with "
                "ev_reid.data.build_pretrain_views (view1, view2, original)"
            )
        queries = [ctx.online[0].embedding, ctx.online[1].embedding]
        return global_consistency_loss(queries, ctx.original.embedding)


@dataclass
class LocalStripeContrastTerm:
    """:class:`ev_core.ssl.LossTerm` computing :func:`local_stripe_contrast` from a step.

    Reads the ``"stripes"`` extra of both views' online outputs (:class:`StripeProjection`).
    """

    loss: ContrastiveKind = "infonce"
    temperature: float = 0.2
    macl_alpha: float = 0.5
    macl_a0: float = 0.0

    def __call__(self, ctx: StepContext) -> torch.Tensor:
        o1, o2 = ctx.online
        if "stripes" not in o1.extras:
            raise ValueError(
                "the encoder has no 'stripes' head: build it with build_upreid_encoder"
            )
        return local_stripe_contrast(
            o1.extras["stripes"],
            o2.extras["stripes"],
            loss=self.loss,
            temperature=self.temperature,
            macl_alpha=self.macl_alpha,
            macl_a0=self.macl_a0,
            gather_distributed=ctx.distributed,
        ).loss


# ----------------------------------------------------------------------------------------
# encoder
# ----------------------------------------------------------------------------------------
class FeatureMapBackbone(nn.Module):
    """timm-style view (``forward_features`` / ``forward_head``) of a ``features_only`` backbone.

    Lets :class:`ev_core.ssl.ContrastiveEncoder` expose the feature map ``[B, C, H, W]`` of the
    very backbone :class:`~ev_reid.models.ReidModel` uses, so that its weights (``body.*``)
    transfer to fine-tuning unchanged.

    Args:
        body: a backbone from :func:`~ev_reid.models.create_backbone`.
        channels: its output channels ``C``.
    """

    def __init__(self, body: nn.Module, channels: int) -> None:
        super().__init__()
        self.body = body
        self.num_features = channels

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, 3, H, W]`` → ``[B, C, h, w]``."""
        out: torch.Tensor = self.body(x)[-1]
        return out

    def forward_head(self, x: torch.Tensor, pre_logits: bool = True) -> torch.Tensor:
        """Global average pooling ``[B, C, h, w]`` → ``[B, C]`` (there are no logits)."""
        return x.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, 3, H, W]`` → pooled ``[B, C]``."""
        return self.forward_head(self.forward_features(x))


class StripeProjection(nn.Module):
    """Extra head: average-pool ``num_stripes`` horizontal stripes and project each to ``D``.

    One MLP (:class:`ev_core.ssl.ProjectionHead`) is shared by all stripes.

    Args:
        channels: feature-map channels ``C``.
        num_stripes: S.
        hidden_dim: MLP hidden width.
        out_dim: embedding dimension ``D`` (UP-ReID: 128).
    """

    def __init__(
        self, channels: int, num_stripes: int = 3, hidden_dim: int = 2048, out_dim: int = 128
    ) -> None:
        super().__init__()
        if num_stripes < 1:
            raise ValueError(f"num_stripes must be >= 1, got {num_stripes}")
        self.num_stripes = num_stripes
        self.head = ProjectionHead(channels, hidden_dim, out_dim)

    def forward(self, output: EncoderOutput) -> torch.Tensor:
        """``output.feature_map [B, C, H, W]`` → stripe embeddings ``[B, S, D]``."""
        fmap = output.feature_map
        if fmap is None or fmap.ndim != 4:
            raise ValueError("StripeProjection needs a [B, C, H, W] feature map")
        stripes = stripe_pool(fmap, self.num_stripes)  # [B, S, C]
        b, s, c = stripes.shape
        out: torch.Tensor = self.head(stripes.reshape(b * s, c))
        return out.reshape(b, s, -1)


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
        persistent_workers=cfg.num_workers > 0,
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
