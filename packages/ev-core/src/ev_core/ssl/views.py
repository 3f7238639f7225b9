"""Two-view batches: what the pre-training loop consumes, and helpers that produce them.

Views are produced either in the data pipeline (a dataset whose transform is
:class:`TwoViewTransform`, batched by a ``DataLoader``) or on the device by a *view
generator*: any callable ``batch -> ViewBatch`` applied to each loader batch after it has been
moved to the device (e.g. batched GPU augmentations, or a generator that also returns the
un-augmented original used by UP-ReID's global-consistency term).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from ev_core.training.runtime import move_to_device

__all__ = ["TwoViewTransform", "ViewBatch", "ViewGenerator", "as_view_batch", "move_to_device"]


@dataclass
class ViewBatch:
    """Two augmented views of the same ``B`` samples, optionally the original images.

    Attributes:
        view1: ``[B, ...]`` first augmented view.
        view2: ``[B, ...]`` second augmented view.
        original: ``[B, ...]`` the un-augmented (e.g. only resized/flipped) images, or ``None``.
        extras: anything else the batch carried (labels, indices, ...), for custom loss terms.
    """

    view1: Tensor
    view2: Tensor
    original: Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.view1, Tensor) or not isinstance(self.view2, Tensor):
            raise TypeError("view1 and view2 must be tensors")
        if self.view1.shape[0] != self.view2.shape[0]:
            raise ValueError(
                f"views must hold the same number of samples, got {self.view1.shape[0]} "
                f"and {self.view2.shape[0]}"
            )
        if self.original is not None and self.original.shape[0] != self.view1.shape[0]:
            raise ValueError(
                f"original has {self.original.shape[0]} samples, views have {self.view1.shape[0]}"
            )

    @property
    def batch_size(self) -> int:
        return int(self.view1.shape[0])


ViewGenerator = Callable[[Any], ViewBatch]


def _from_views(views: Sequence[Any], extras: dict[str, Any]) -> ViewBatch:
    if len(views) not in (2, 3) or not all(isinstance(v, Tensor) for v in views):
        raise ValueError(
            "a two-view batch needs 2 view tensors (view1, view2) or 3 (view1, view2, original)"
        )
    return ViewBatch(views[0], views[1], views[2] if len(views) == 3 else None, extras)


def as_view_batch(batch: Any) -> ViewBatch:
    """Interpret a loader batch as a :class:`ViewBatch` (the default view generator).

    Accepted layouts:

    * a :class:`ViewBatch`;
    * a mapping with ``"view1"``, ``"view2"`` and optionally ``"original"`` (other keys go to
      ``extras``);
    * ``(views, target, ...)`` where ``views`` is a list/tuple of 2 or 3 tensors (what a
      torchvision dataset with a :class:`TwoViewTransform` yields); ``target`` goes to
      ``extras["target"]``, further items to ``extras["rest"]``;
    * a list/tuple of 2 or 3 tensors ``(view1, view2[, original])``.

    Raises:
        ValueError: for any other layout, naming what was received.
    """
    if isinstance(batch, ViewBatch):
        return batch
    if isinstance(batch, Mapping):
        if "view1" not in batch or "view2" not in batch:
            raise ValueError(f"a mapping batch needs 'view1' and 'view2' keys, got {sorted(batch)}")
        extras = {k: v for k, v in batch.items() if k not in ("view1", "view2", "original")}
        return ViewBatch(batch["view1"], batch["view2"], batch.get("original"), extras)
    if isinstance(batch, (list, tuple)) and batch:
        if isinstance(batch[0], (list, tuple)):
            carried: dict[str, Any] = {}
            if len(batch) > 1:
                carried["target"] = batch[1]
            if len(batch) > 2:
                carried["rest"] = list(batch[2:])
            return _from_views(batch[0], carried)
        return _from_views(batch, {})
    raise ValueError(
        f"cannot read two views from a batch of type {type(batch).__name__}: yield a ViewBatch, "
        "a dict with view1/view2, (view1, view2[, original]) or ((view1, view2), target), "
        "or pass view_generator="
    )


class TwoViewTransform:
    """Per-sample transform returning two augmented views (and optionally the original).

    Args:
        transform: augmentation for the first view (and the second unless ``transform2``).
        transform2: augmentation for the second view (asymmetric recipes such as BYOL's).
        original_transform: if given, a third output made by this (non-random, e.g.
            resize + to-tensor) transform: the "original" image of UP-ReID's global term.
    """

    def __init__(
        self,
        transform: Callable[[Any], Tensor],
        transform2: Callable[[Any], Tensor] | None = None,
        original_transform: Callable[[Any], Tensor] | None = None,
    ) -> None:
        self.transform = transform
        self.transform2 = transform2 if transform2 is not None else transform
        self.original_transform = original_transform

    def __call__(self, sample: Any) -> tuple[Tensor, ...]:
        views = (self.transform(sample), self.transform2(sample))
        if self.original_transform is not None:
            return (*views, self.original_transform(sample))
        return views

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(transform={self.transform!r}, transform2={self.transform2!r}, "
            f"original_transform={self.original_transform!r})"
        )
