"""A ``torch.utils.data.Dataset`` over re-id records."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError
from torchvision.transforms.v2 import functional as TF

from ev_core.errors import EvError
from ev_reid.records import ReidRecord

__all__ = ["ImageDataset", "ImageReadError", "read_image"]


class ImageReadError(EvError, OSError):
    """An image file is missing or cannot be decoded; the message names the path."""


def read_image(path: str | os.PathLike[str]) -> Image.Image:
    """Open an image as RGB, fully decoded.

    Raises:
        ImageReadError: naming ``path`` when the file is missing, truncated or not an image.
    """
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise ImageReadError(f"cannot read image {os.fspath(path)!r}: {exc}") from exc


class ImageDataset(torch.utils.data.Dataset[tuple[Any, int, int, int]]):
    """Images of re-id records, for a ``DataLoader``.

    Item ``i`` is ``(image, pid, camid, i)``: the image is ``transform(PIL RGB image)`` or,
    without a transform, a ``uint8`` tensor ``[3, H, W]``; ``records[i].path`` gives the path.

    Args:
        records: the records (e.g. ``dataset.train``).
        transform: applied to the PIL image (e.g. ``build_train_transform(cfg)``).

    Raises:
        ImageReadError: on access, naming the path of an unreadable image.
    """

    def __init__(
        self, records: Sequence[ReidRecord], transform: Callable[[Image.Image], Any] | None = None
    ) -> None:
        self.records = list(records)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[Any, int, int, int]:
        rec = self.records[index]
        img = read_image(rec.path)
        out = TF.pil_to_tensor(img) if self.transform is None else self.transform(img)
        return out, rec.pid, rec.camid, index
