"""The small UP-ReID → BoT recipe shared by the demo and the UP-ReID benchmark.

A narrow ResNet-18 (last stride 1) is pre-trained with MoCo-v2 and, depending on the
:data:`VARIANTS` entry, UP-ReID's I² terms on unlabelled images, then fine-tuned with the BoT
recipe and evaluated under the Market protocol. :class:`SmallRecipe` holds every size and
schedule; :func:`pretrain_variant` and :func:`finetune` run the two stages.

Example::

    recipe = SmallRecipe(pretrain_epochs=2, finetune_epochs=8)
    backbone = pretrain_variant("upreid", unlabelled_records, "runs/pre", recipe, seed=0)
    result = finetune(Market1501(root), backbone, "runs/ft", recipe, seed=0)
    print(result.metrics["mAP"])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ev_core.ssl import PretrainConfig
from ev_reid.data.transforms import PretrainViewConfig, ReidTransformConfig
from ev_reid.losses.upreid import LocalNegatives
from ev_reid.models.reid import ReidModelConfig
from ev_reid.pretrain import UPReIDConfig, pretrain_upreid
from ev_reid.records import ReidRecord

if TYPE_CHECKING:
    from ev_reid.datasets import ReidDataset
    from ev_reid.train import TrainConfig, TrainResult

__all__ = ["VARIANTS", "PretrainVariant", "SmallRecipe", "finetune", "pretrain_variant"]


@dataclass(frozen=True)
class PretrainVariant:
    """Which pre-training terms one ablation row uses.

    Attributes:
        pretrain: pre-train at all (``False``: fine-tune from random initialisation).
        global_term: UP-ReID's global consistency.
        local_term: UP-ReID's local stripe contrast.
        local_negatives: its negatives (``"batch"`` or ``"image"``).
        loss: instance (and local) contrastive loss, ``"infonce"`` or ``"macl"``.
    """

    pretrain: bool = True
    global_term: bool = True
    local_term: bool = True
    local_negatives: LocalNegatives = "batch"
    loss: str = "infonce"


VARIANTS: dict[str, PretrainVariant] = {
    "scratch": PretrainVariant(pretrain=False, global_term=False, local_term=False),
    "moco": PretrainVariant(global_term=False, local_term=False),
    "global-only": PretrainVariant(local_term=False),
    "stripe-only": PretrainVariant(global_term=False),
    "upreid": PretrainVariant(),
    "upreid-image": PretrainVariant(local_negatives="image"),
    "upreid-macl": PretrainVariant(loss="macl"),
}
"""The ablation rows: MoCo-v2 alone, with one I² term, with both (local negatives from the
batch or from the same image only), and with MACL as the contrastive loss."""


@dataclass(frozen=True)
class SmallRecipe:
    """Sizes and schedules of the small recipe (defaults: the benchmark's).

    Attributes:
        image_size: ``(height, width)`` of the crops.
        channels: ResNet-18 stage widths (narrow: seconds per epoch on a CPU).
        pretrain_epochs: pre-training epochs.
        pretrain_batch: pre-training images per step.
        queue_size: MoCo queue length.
        momentum: MoCo momentum.
        warmup_steps: pre-training warm-up steps.
        finetune_epochs: BoT fine-tuning epochs.
        finetune_lr: Adam learning rate of fine-tuning.
        num_identities: P of the P×K fine-tuning batches.
        num_instances: K.
        num_workers: DataLoader workers of both stages.
        device: where both stages run.
    """

    image_size: tuple[int, int] = (64, 32)
    channels: tuple[int, int, int, int] = (16, 32, 64, 128)
    pretrain_epochs: int = 4
    pretrain_batch: int = 32
    queue_size: int = 2048
    momentum: float = 0.99
    warmup_steps: int = 10
    finetune_epochs: int = 16
    finetune_lr: float = 1e-3
    num_identities: int = 8
    num_instances: int = 4
    num_workers: int = 0
    device: str = "cpu"

    def backbone(self) -> dict[str, Any]:
        """``ReidModelConfig`` fields of the narrow ResNet-18 both stages share."""
        return {
            "backbone": "resnet18",
            "backbone_kwargs": {"channels": list(self.channels), "stem_width": self.channels[0]},
            "last_stride_1": True,
        }


def pretrain_config(
    variant: str, out_dir: str | Path, recipe: SmallRecipe, seed: int
) -> UPReIDConfig:
    """The :class:`~ev_reid.pretrain.UPReIDConfig` of one :data:`VARIANTS` entry."""
    v = _variant(variant)
    if not v.pretrain:
        raise ValueError(f"variant {variant!r} has no pre-training")
    h, w = recipe.image_size
    net = recipe.backbone()
    return UPReIDConfig(
        out_dir=str(out_dir),
        backbone=net["backbone"],
        backbone_kwargs=net["backbone_kwargs"],
        last_stride_1=net["last_stride_1"],
        proj_hidden_dim=4 * recipe.channels[-1],
        proj_dim=64,
        global_term=v.global_term,
        local_term=v.local_term,
        local_negatives=v.local_negatives,
        views=PretrainViewConfig(height=h, width=w),
        ssl=PretrainConfig(
            method="moco",
            loss=v.loss,  # type: ignore[arg-type]
            temperature=0.2,
            queue_size=recipe.queue_size,
            momentum=recipe.momentum,
            epochs=recipe.pretrain_epochs,
            optimizer="sgd",
            lr=0.3,
            warmup_steps=recipe.warmup_steps,
            amp=False,
            device=recipe.device,
            seed=seed,
            log_every_steps=10,
        ),
        batch_size=recipe.pretrain_batch,
        num_workers=recipe.num_workers,
    )


def pretrain_variant(
    variant: str,
    images: Sequence[ReidRecord],
    out_dir: str | Path,
    recipe: SmallRecipe,
    seed: int = 0,
) -> Path | None:
    """Pre-train one variant on unlabelled ``images``.

    Returns:
        ``backbone.safetensors`` for :func:`finetune`, or ``None`` for ``"scratch"``.
    """
    if not _variant(variant).pretrain:
        return None
    result = pretrain_upreid(pretrain_config(variant, out_dir, recipe, seed), images)
    if result.backbone_path is None:
        raise RuntimeError(f"pre-training {variant!r} in {out_dir} stopped before the end")
    return result.backbone_path


def finetune_config(
    init: str | Path | None, out_dir: str | Path, recipe: SmallRecipe, seed: int
) -> TrainConfig:
    """The BoT :class:`~ev_reid.train.TrainConfig` of the recipe (evaluated once, at the end)."""
    from ev_reid.train import TrainConfig

    h, w = recipe.image_size
    epochs = recipe.finetune_epochs
    return TrainConfig(
        out_dir=str(out_dir),
        model=ReidModelConfig(**recipe.backbone()),
        init_checkpoint=None if init is None else str(init),
        transform=ReidTransformConfig(height=h, width=w, padding=max(2, h // 25)),
        num_identities=recipe.num_identities,
        num_instances=recipe.num_instances,
        epochs=epochs,
        lr=recipe.finetune_lr,
        warmup_epochs=max(1, epochs // 8),
        milestones=(int(epochs * 0.6), int(epochs * 0.85)),
        eval_every=0,
        num_workers=recipe.num_workers,
        device=recipe.device,
        seed=seed,
    )


def finetune(
    dataset: ReidDataset,
    init: str | Path | None,
    out_dir: str | Path,
    recipe: SmallRecipe,
    seed: int = 0,
) -> TrainResult:
    """BoT fine-tuning from ``init`` (``None``: scratch) and Market-protocol evaluation."""
    from ev_reid.train import train

    result = train(finetune_config(init, out_dir, recipe, seed), dataset)
    if result.metrics is None:
        raise RuntimeError(f"{dataset.name} has no query/gallery split to evaluate on")
    return result


def _variant(name: str) -> PretrainVariant:
    try:
        return VARIANTS[name]
    except KeyError:
        raise ValueError(f"unknown variant {name!r}; known: {', '.join(VARIANTS)}") from None
