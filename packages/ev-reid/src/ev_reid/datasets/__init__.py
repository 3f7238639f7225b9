"""Re-id datasets: records of (image path, person id, camera id), torchreid-style.

``create("market1501", root)`` builds a dataset by name; ``names()`` lists the names.
Every dataset exposes ``train``, ``query`` and ``gallery`` lists of
:class:`~ev_reid.records.ReidRecord`; wrap a list in :class:`ImageDataset` for a DataLoader.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar

from ev_reid.datasets.base import (
    CombinedDataset,
    DatasetLayoutError,
    ReidDataset,
    combine_datasets,
    relabel,
)
from ev_reid.datasets.cuhk03 import CUHK03, extract_cuhk03_images
from ev_reid.datasets.generic import ImageFolderDataset, ImageListDataset
from ev_reid.datasets.market1501 import Market1501, PersonX
from ev_reid.datasets.msmt17 import MSMT17
from ev_reid.datasets.synthetic import SyntheticMarketConfig, generate_synthetic_market
from ev_reid.datasets.torch_dataset import ImageDataset, ImageReadError, read_image

__all__ = [
    "CUHK03",
    "MSMT17",
    "CombinedDataset",
    "DatasetLayoutError",
    "ImageDataset",
    "ImageFolderDataset",
    "ImageListDataset",
    "ImageReadError",
    "Market1501",
    "PersonX",
    "ReidDataset",
    "SyntheticMarketConfig",
    "combine_datasets",
    "create",
    "extract_cuhk03_images",
    "generate_synthetic_market",
    "names",
    "read_image",
    "register",
    "relabel",
]

F = TypeVar("F", bound=Callable[..., ReidDataset])

_REGISTRY: dict[str, Callable[..., ReidDataset]] = {}


def register(name: str) -> Callable[[F], F]:
    """Register a dataset class or factory ``f(root, **kwargs) -> ReidDataset`` under ``name``.

    Raises:
        ValueError: if ``name`` is taken.
    """

    def decorator(factory: F) -> F:
        if name in _REGISTRY:
            raise ValueError(f"dataset {name!r} is registered twice")
        _REGISTRY[name] = factory
        return factory

    return decorator


for _cls in (Market1501, CUHK03, MSMT17, PersonX, ImageListDataset, ImageFolderDataset):
    register(_cls.name)(_cls)


def names() -> list[str]:
    """Registered dataset names, sorted."""
    return sorted(_REGISTRY)


def create(name: str, root: str | os.PathLike[str], **kwargs: Any) -> ReidDataset:
    """Build the dataset registered as ``name`` (case-insensitive) from ``root``.

    Args:
        name: e.g. ``"market1501"``, ``"cuhk03"``, ``"msmt17"``, ``"personx"``,
            ``"image_list"``, ``"image_folder"`` (see :func:`names`).
        root: the dataset folder (or a folder holding it).
        **kwargs: passed to the dataset (e.g. ``labeled=False`` for CUHK03).

    Raises:
        KeyError: listing the known names if ``name`` is unknown.
    """
    try:
        factory = _REGISTRY[name.lower()]
    except KeyError:
        raise KeyError(f"unknown dataset {name!r}; known: {', '.join(names())}") from None
    return factory(root, **kwargs)
