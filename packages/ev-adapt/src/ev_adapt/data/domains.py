"""Where the images of a scenario come from: in-memory tensors or MME image lists.

Augmentations draw from the ``torch.Generator`` they are handed, so that a batch is a pure
function of its indices and seed (cheap to skip and exact to replay on resume).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Protocol

import torch
from torch import Tensor

from ev_adapt.data.lists import ImageListError, ListEntry, SSDALists

__all__ = ["DomainData", "ImageListDomainData", "TensorDomainData"]

TensorAugment = Callable[[Tensor, torch.Generator], Tensor]


class DomainData(Protocol):
    """The images of one semi-supervised adaptation scenario."""

    num_classes: int
    sizes: dict[str, int]  # "source", "labeled_target", "unlabeled_target"

    def labeled(
        self, split: str, index: Tensor, generator: torch.Generator
    ) -> tuple[Tensor, Tensor]:
        """Weakly augmented images ``[B, C, H, W]`` and labels ``[B]`` of ``split`` at ``index``."""
        ...

    def unlabeled(self, index: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Weak and strong views ``[B, C, H, W]`` of the unlabelled target images at ``index``."""
        ...

    def evaluation(self, split: str, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        """Un-augmented ``(images, labels)`` batches of ``"validation"`` or ``"test"``."""
        ...


class TensorDomainData:
    """A scenario held in memory as tensors (e.g. :func:`~ev_adapt.data.digits.digits_shift`).

    Args:
        splits: ``{"source", "labeled_target", "unlabeled_target", "validation", "test"}`` →
            ``(images [N, C, H, W], labels [N])``; the unlabelled target's labels are kept
            only for analysis, never used for training.
        weak: weak augmentation ``(images, generator) -> images``.
        strong: strong augmentation, likewise.
        num_classes: number of classes.
    """

    def __init__(
        self,
        splits: dict[str, tuple[Tensor, Tensor]],
        weak: TensorAugment,
        strong: TensorAugment,
        num_classes: int,
    ) -> None:
        needed = {"source", "labeled_target", "unlabeled_target", "validation", "test"}
        if needed - splits.keys():
            raise ValueError(f"missing splits: {sorted(needed - splits.keys())}")
        self.splits = splits
        self.weak, self.strong = weak, strong
        self.num_classes = num_classes
        self.sizes = {
            k: len(splits[k][1]) for k in ("source", "labeled_target", "unlabeled_target")
        }

    def labeled(
        self, split: str, index: Tensor, generator: torch.Generator
    ) -> tuple[Tensor, Tensor]:
        x, y = self.splits[split]
        return self.weak(x[index], generator), y[index]

    def unlabeled(self, index: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        x = self.splits["unlabeled_target"][0][index]
        return self.weak(x, generator), self.strong(x, generator)

    def evaluation(self, split: str, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        x, y = self.splits[split]
        for start in range(0, len(y), batch_size):
            yield x[start : start + batch_size], y[start : start + batch_size]


class ImageListDomainData:
    """A scenario read from MME image lists (images decoded with PIL on demand).

    Args:
        lists: the scenario's :class:`~ev_adapt.data.lists.SSDALists`.
        weak: PIL image → tensor, the weak augmentation (torchvision transforms).
        strong: PIL image → tensor, the strong augmentation (e.g. with ``RandAugment(2, 10)``).
        test: PIL image → tensor, for evaluation.

    torchvision transforms draw from torch's global RNG: each call runs under
    ``torch.random.fork_rng`` seeded from the given generator, so batches stay replayable.
    """

    def __init__(
        self,
        lists: SSDALists,
        weak: Callable[[object], Tensor],
        strong: Callable[[object], Tensor],
        test: Callable[[object], Tensor],
    ) -> None:
        self.lists = lists
        self.weak, self.strong, self.test = weak, strong, test
        self.num_classes = lists.num_classes
        self._entries = {
            "source": lists.labeled_source,
            "labeled_target": lists.labeled_target,
            "unlabeled_target": lists.unlabeled_target,
            "validation": lists.validation,
            "test": lists.unlabeled_target,
        }
        self.sizes = {
            k: len(self._entries[k]) for k in ("source", "labeled_target", "unlabeled_target")
        }

    @staticmethod
    def _open(entry: ListEntry) -> object:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(entry.path) as img:
                return img.convert("RGB")
        except (OSError, UnidentifiedImageError) as exc:
            raise ImageListError(f"cannot decode the image: {exc}", path=entry.path) from None

    def _apply(
        self, transform: Callable[[object], Tensor], img: object, generator: torch.Generator
    ) -> Tensor:
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return transform(img)

    def labeled(
        self, split: str, index: Tensor, generator: torch.Generator
    ) -> tuple[Tensor, Tensor]:
        entries = [self._entries[split][i] for i in index.tolist()]
        x = torch.stack([self._apply(self.weak, self._open(e), generator) for e in entries])
        return x, torch.tensor([e.label for e in entries])

    def unlabeled(self, index: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        images = [self._open(self._entries["unlabeled_target"][i]) for i in index.tolist()]
        weak = torch.stack([self._apply(self.weak, img, generator) for img in images])
        strong = torch.stack([self._apply(self.strong, img, generator) for img in images])
        return weak, strong

    def evaluation(self, split: str, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        entries = self._entries[split]
        for start in range(0, len(entries), batch_size):
            chunk = entries[start : start + batch_size]
            yield (
                torch.stack([self.test(self._open(e)) for e in chunk]),
                torch.tensor([e.label for e in chunk]),
            )
