"""Feature extraction for evaluation and indexing, with optional flip averaging."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ev_core.progress import progress

__all__ = ["extract_features"]

_IMAGE_KEYS = ("img", "image", "images", "pixel_values")


def _images(batch: Any) -> torch.Tensor:
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, Mapping):
        for key in _IMAGE_KEYS:
            if key in batch:
                return batch[key]
        raise KeyError(f"batch dict has none of the image keys {_IMAGE_KEYS}: {sorted(batch)}")
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    raise TypeError(f"cannot find images in a batch of type {type(batch).__name__}")


@torch.no_grad()
def extract_features(
    model: nn.Module,
    loader: Iterable[Any],
    *,
    flip: bool = False,
    device: torch.device | str | None = None,
    normalize: bool = False,
    desc: str = "extract features",
) -> torch.Tensor:
    """Run ``model`` in eval mode over ``loader`` and stack its embeddings.

    Args:
        model: maps images ``[B, 3, H, W]`` to features ``[B, D]``.
        loader: yields image tensors, ``(images, ...)`` tuples, or dicts with an ``"img"``
            (or ``"image"``/``"images"``/``"pixel_values"``) entry.
        flip: average the features of the images and their horizontal flips.
        device: where the model runs (default: the device of its first parameter, else CPU).
        normalize: L2-normalise the (flip-averaged) features.
        desc: progress bar label.

    Returns:
        ``[N, D]`` float32 features on the CPU, in loader order.
    """
    if device is None:
        first = next(model.parameters(), None)
        dev = first.device if first is not None else torch.device("cpu")
    else:
        dev = torch.device(device)
    was_training = model.training
    model.eval()
    feats: list[torch.Tensor] = []
    try:
        total = len(loader) if hasattr(loader, "__len__") else None  # type: ignore[arg-type]
        for batch in progress(loader, desc=desc, total=total):
            x = _images(batch).to(dev, non_blocking=True)
            f = model(x).float()
            if f.ndim != 2:
                raise ValueError(f"model must return [B, D] features, got {tuple(f.shape)}")
            if flip:
                f = (f + model(torch.flip(x, dims=[3])).float()) / 2
            if normalize:
                f = F.normalize(f, p=2.0, dim=1)
            feats.append(f.cpu())
    finally:
        model.train(was_training)
    if not feats:
        raise ValueError("the loader yielded no batches")
    return torch.cat(feats)
