"""The in-memory form of one labelled point-cloud scene, and the data errors."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from ev_core.errors import EvError

__all__ = ["IGNORE_INDEX", "PointDataError", "PointScene"]

#: Label of points that are not scored (unlabelled, or outside the evaluation classes).
IGNORE_INDEX = -1


class PointDataError(EvError, ValueError):
    """A dataset file or folder is missing or malformed; the message names it (and the line)."""

    def __init__(
        self, message: str, path: str | os.PathLike[str] | None = None, line: int | None = None
    ) -> None:
        self.line = line
        if line is not None:
            message = f"{path}:{line}: {message}" if path is not None else f"line {line}: {message}"
        super().__init__(message, path=path)


@dataclass
class PointScene:
    """One scene: points with colours, semantic and instance labels.

    Attributes:
        name: scene id (``Area_5/office_1``, ``scene0000_00``).
        coord: ``[P, 3]`` float32 metres.
        color: ``[P, 3]`` uint8 RGB.
        segment: ``[P]`` int16 class index in ``0..C-1`` or :data:`IGNORE_INDEX`.
        instance: ``[P]`` int16 instance id (-1 = none).
    """

    name: str
    coord: np.ndarray
    color: np.ndarray
    segment: np.ndarray
    instance: np.ndarray

    def __post_init__(self) -> None:
        p = self.coord.shape[0]
        if self.coord.shape != (p, 3) or self.color.shape != (p, 3):
            raise PointDataError(
                f"scene {self.name}: coord/color must be [P, 3], got {self.coord.shape}, {self.color.shape}"
            )
        if self.segment.shape != (p,) or self.instance.shape != (p,):
            raise PointDataError(f"scene {self.name}: segment/instance must be [{p}]")
        self.coord = np.ascontiguousarray(self.coord, dtype=np.float32)
        self.color = np.ascontiguousarray(self.color, dtype=np.uint8)
        self.segment = np.ascontiguousarray(self.segment, dtype=np.int16)
        self.instance = np.ascontiguousarray(self.instance, dtype=np.int16)

    def __len__(self) -> int:
        return int(self.coord.shape[0])
