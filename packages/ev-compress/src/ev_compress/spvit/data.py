"""Data for SPViT's CLI, demo and benchmark: an image folder, or scikit-learn's digits upsampled.

The digits set (1,797 8×8 grey images, 10 classes) is small and real: upsampled to the model's
input size and repeated over three channels it makes a quick, honest classification check.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset

from ev_core.errors import EvError, require

__all__ = ["digits_split", "image_folder"]


def digits_split(
    img_size: int, test_fraction: float = 0.25, seed: int = 0
) -> tuple[TensorDataset, TensorDataset]:
    """scikit-learn's digits as ``[3, img_size, img_size]`` images (bilinear upsampling,
    standardised), split into train / test with a fixed seed.

    Raises:
        MissingDependencyError: without scikit-learn.
    """
    datasets = require("sklearn.datasets", "digits", "ev-compress", "the digits data")
    bunch = datasets.load_digits()
    x = torch.as_tensor(bunch.images, dtype=torch.float32)[:, None] / 16.0
    x = F.interpolate(x, size=(img_size, img_size), mode="bilinear", align_corners=False)
    x = ((x - 0.5) / 0.5).expand(-1, 3, -1, -1).contiguous()
    y = torch.as_tensor(bunch.target, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=g)
    n_test = round(len(y) * test_fraction)
    test, train = perm[:n_test], perm[n_test:]
    return TensorDataset(x[train], y[train]), TensorDataset(x[test], y[test])


def image_folder(path: str | os.PathLike[str], img_size: int) -> Dataset:
    """A torchvision ``ImageFolder`` resized/centre-cropped to ``img_size`` (ImageNet norm).

    Raises:
        EvError: naming ``path`` when it is not a folder of class sub-folders with images.
    """
    root = Path(path)
    if not root.is_dir():
        raise EvError("--data must be 'digits' or a folder of class sub-folders", path=root)
    from torchvision import datasets, transforms

    tf = transforms.Compose(
        [
            transforms.Resize(int(img_size * 256 / 224)),
            transforms.CenterCrop(img_size),
            transforms.ToTensor(),
            transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        ]
    )
    try:
        return datasets.ImageFolder(str(root), transform=tf)
    except (FileNotFoundError, RuntimeError) as exc:
        raise EvError(f"not an image folder: {exc}", path=root) from None
