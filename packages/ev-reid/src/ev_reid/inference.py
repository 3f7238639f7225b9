"""Using a trained re-id model: load it, embed images, evaluate, index and search.

:func:`load_for_inference` reads a ``model.safetensors`` written by :func:`ev_reid.train.train`
(or any ev-reid checkpoint with its JSON) once and returns the model in eval mode, the
test-time transform it was trained with and the checkpoint's metadata. The other functions
build on it:

* :func:`extract_record_features`: features of a list of records (test transform, flip
  averaging);
* :func:`evaluate_model` / :func:`evaluate_checkpoint`: CMC / mAP / mINP on a query/gallery;
* :func:`build_index` / :func:`search_index`: a saved :class:`~ev_reid.retrieval.ReidIndex`
  and ranked gallery hits for query images.

Every problem with a checkpoint file raises :class:`CheckpointError` naming the file and what is
wrong with it (missing, truncated, no JSON beside it, no model config, weights that do not fit).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ev_core.checkpoint import config_path_for
from ev_core.errors import EvError
from ev_core.io import write_json
from ev_reid.data.transforms import ReidTransformConfig
from ev_reid.models.reid import ReidModel, ReidModelConfig
from ev_reid.records import ReidRecord

if TYPE_CHECKING:
    from ev_reid.datasets import ReidDataset
    from ev_reid.evaluation import RankResult
    from ev_reid.retrieval import IndexConfig, ReidIndex, SearchHit

__all__ = [
    "CheckpointError",
    "InferenceMetadata",
    "build_index",
    "evaluate_checkpoint",
    "evaluate_model",
    "extract_record_features",
    "load_for_inference",
    "read_checkpoint_json",
    "search_index",
]


class CheckpointError(EvError):
    """A checkpoint file is missing, truncated, or not an ev-reid model; the message names it."""


@dataclass
class InferenceMetadata:
    """What the checkpoint's JSON says about the model.

    Attributes:
        path: the weights file.
        model: the model architecture.
        transform: the test-time size and normalisation (the training run's, else defaults).
        dataset: the dataset it was trained on, when recorded.
        epochs: training epochs, when recorded.
        metrics: the final evaluation recorded at training time, when any.
        raw: the whole ``metadata`` object of the JSON.
    """

    path: Path
    model: ReidModelConfig
    transform: ReidTransformConfig
    dataset: str | None = None
    epochs: int | None = None
    metrics: dict[str, Any] | None = None
    raw: dict[str, Any] = field(default_factory=dict)


def read_checkpoint_json(checkpoint: str | Path) -> tuple[ReidModelConfig, dict[str, Any]]:
    """The model config and metadata in the JSON beside a ``.safetensors`` checkpoint.

    Raises:
        CheckpointError: naming the file when the weights or the JSON are missing, the JSON
            is not valid, or it holds no :class:`~ev_reid.models.ReidModelConfig`.
    """
    weights = Path(checkpoint)
    if not weights.is_file():
        raise CheckpointError("no such checkpoint file", path=weights)
    meta_file = config_path_for(weights)
    if not meta_file.is_file():
        raise CheckpointError(
            f"{meta_file.name} (the model config) is missing beside the weights {weights}: "
            "an ev-reid checkpoint is the .safetensors file plus its .json",
            path=meta_file,
        )
    try:
        info = json.loads(meta_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"not valid JSON ({exc})", path=meta_file) from exc
    cfg = info.get("config") if isinstance(info, dict) else None
    if isinstance(cfg, dict) and isinstance(cfg.get("model"), dict):
        cfg = cfg["model"]
    if not isinstance(cfg, dict) or "backbone" not in cfg:
        raise CheckpointError(
            "holds no ReidModelConfig (expected config.model or config with a 'backbone'); "
            "is it a UP-ReID pre-training output? Fine-tune it with `ev-reid train --init` first",
            path=meta_file,
        )
    try:
        model_cfg = ReidModelConfig.from_dict(cfg)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"invalid model config: {exc}", path=meta_file) from exc
    meta = info.get("metadata")
    return model_cfg, meta if isinstance(meta, dict) else {}


def _transform_from(meta: dict[str, Any], meta_file: Path) -> ReidTransformConfig:
    tf = meta.get("transform")
    if tf is None:
        return ReidTransformConfig()
    if not isinstance(tf, dict):
        raise CheckpointError(f"metadata.transform must be an object, got {tf!r}", path=meta_file)
    fields: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in tf.items()}
    try:
        return ReidTransformConfig(**fields)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"invalid metadata.transform: {exc}", path=meta_file) from exc


def _read_weights(weights: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(weights))
    except Exception as exc:  # SafetensorError, OSError: truncated or not safetensors
        size = weights.stat().st_size
        raise CheckpointError(
            f"cannot read the weights ({size} bytes; truncated or not a safetensors file): {exc}",
            path=weights,
        ) from exc


def load_for_inference(
    checkpoint: str | Path, *, device: str | torch.device = "cpu"
) -> tuple[ReidModel, ReidTransformConfig, InferenceMetadata]:
    """Rebuild a trained model for feature extraction, reading its JSON once.

    Args:
        checkpoint: ``model.safetensors`` (its ``model.json`` beside it).
        device: where the model goes (``"auto"``: CUDA when available).

    Returns:
        ``(model, transform, metadata)``: the model in eval mode on ``device``, the test-time
        transform settings and an :class:`InferenceMetadata`.

    Raises:
        CheckpointError: naming the file for every problem with the checkpoint.
    """
    from ev_core.training import resolve_device

    weights = Path(checkpoint)
    model_cfg, meta = read_checkpoint_json(weights)
    transform = _transform_from(meta, config_path_for(weights))
    state = _read_weights(weights)
    try:  # the weights come from the file: never fetch timm's pretrained ones
        model = ReidModel(dataclasses.replace(model_cfg, pretrained=False))
    except Exception as exc:
        raise CheckpointError(f"cannot build its model {model_cfg}: {exc}", path=weights) from exc
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(
        k for k in set(state) & set(expected) if state[k].shape != expected[k].shape
    )
    if missing or unexpected or mismatched:
        raise CheckpointError(
            f"the weights do not fit its model config ({model_cfg.backbone}): "
            f"{len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected "
            f"(e.g. {unexpected[:3]}), {len(mismatched)} with other shapes (e.g. {mismatched[:3]})",
            path=weights,
        )
    model.load_state_dict(state)
    model.to(resolve_device(str(device)) if not isinstance(device, torch.device) else device)
    model.eval()
    epochs = meta.get("epochs")
    metrics = meta.get("metrics")
    dataset = meta.get("dataset")
    metadata = InferenceMetadata(
        path=weights,
        model=model_cfg,
        transform=transform,
        dataset=dataset if isinstance(dataset, str) else None,
        epochs=epochs if isinstance(epochs, int) else None,
        metrics=metrics if isinstance(metrics, dict) else None,
        raw=meta,
    )
    return model, transform, metadata


def _model_device(model: nn.Module) -> torch.device:
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


@torch.no_grad()
def extract_record_features(
    model: nn.Module,
    records: Sequence[ReidRecord],
    *,
    transform: ReidTransformConfig | None = None,
    flip: bool = False,
    batch_size: int = 128,
    num_workers: int = 0,
    device: torch.device | str | None = None,
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
        device: where the model runs (default: where its parameters are).
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
    dev = _model_device(model) if device is None else torch.device(device)
    return extract_features(model, loader, flip=flip, device=dev, desc=desc)


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
    device: torch.device | str | None = None,
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
        device: where the model runs (default: where its parameters are).
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
    """Evaluate a ``model.safetensors`` written by :func:`~ev_reid.train.train` on ``dataset``.

    The image size and normalisation are those the model was trained with (stored beside
    the weights), else :class:`~ev_reid.data.ReidTransformConfig`'s defaults. The query and
    gallery images are checked before any feature is extracted.

    Raises:
        DatasetLayoutError: if the dataset has no query or gallery split.
        CheckpointError: for a bad checkpoint.
        ImageReadError: listing every unreadable query/gallery image.
    """
    from ev_reid.datasets import DatasetLayoutError
    from ev_reid.validation import validate_images

    if not dataset.query or not dataset.gallery:
        raise DatasetLayoutError(
            f"{dataset.name}: evaluation needs query and gallery images", path=dataset.dataset_dir
        )
    model, transform, _ = load_for_inference(checkpoint, device=device)
    validate_images([*dataset.query, *dataset.gallery])
    return evaluate_model(
        model,
        dataset.query,
        dataset.gallery,
        transform=transform,
        metric=metric,
        flip=flip,
        rerank=rerank,
        batch_size=batch_size,
        num_workers=num_workers,
        use_metric_cuhk03=dataset.use_metric_cuhk03,
    )


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

    The index backend (e.g. faiss) and the images are checked before any feature is
    extracted. Besides the index files (:meth:`~ev_reid.retrieval.ReidIndex.save`),
    ``out_dir`` gets ``model.json`` naming the checkpoint and the feature settings, so that
    :func:`search_index` embeds queries the same way.

    Returns:
        The built :class:`~ev_reid.retrieval.ReidIndex`.
    """
    from ev_core.training import check_writable
    from ev_reid.retrieval import IndexConfig, ReidIndex
    from ev_reid.validation import check_index_backend, validate_images

    config = config if config is not None else IndexConfig()
    check_index_backend(config)
    check_writable(out_dir)
    model, transform, _ = load_for_inference(checkpoint, device=device)
    validate_images(records)
    feats = extract_record_features(
        model,
        records,
        transform=transform,
        flip=flip,
        batch_size=batch_size,
        num_workers=num_workers,
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

    Raises:
        CheckpointError: when ``index_dir`` names no model and none is given, or the model
            checkpoint is bad.
    """
    from ev_reid.retrieval import ReidIndex
    from ev_reid.validation import validate_images

    src = Path(index_dir)
    info: dict[str, Any] = {}
    model_json = src / "model.json"
    if model_json.is_file():
        try:
            info = json.loads(model_json.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"not valid JSON ({exc})", path=model_json) from exc
        if not isinstance(info, dict):
            raise CheckpointError("must hold a JSON object", path=model_json)
    ckpt = checkpoint if checkpoint is not None else info.get("checkpoint")
    if not isinstance(ckpt, (str, Path)):
        raise CheckpointError(
            "has no model.json naming the model: pass the model checkpoint", path=src
        )
    index = ReidIndex.load(src)
    model, transform, _ = load_for_inference(ckpt, device=device)
    validate_images(queries)
    feats = extract_record_features(
        model,
        queries,
        transform=transform,
        flip=bool(info.get("flip", False)),
        batch_size=batch_size,
        num_workers=num_workers,
        desc="query features",
    )
    return index.search(feats, min(k, len(index)))
