"""Grid (voxel) subsampling: one point per occupied cell, with the map back to every point."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ev_points.data.scene import IGNORE_INDEX, PointDataError, PointScene

__all__ = ["GridSample", "grid_subsample"]


@dataclass
class GridSample:
    """Result of :func:`grid_subsample`.

    Attributes:
        scene: the subsampled scene (cell mean of coordinates and colours, majority label of
            the labelled points in the cell, -1 when none is labelled; instance of the first point).
        inverse: ``[P]`` cell of each original point, to project predictions back.
    """

    scene: PointScene
    inverse: np.ndarray


def grid_subsample(scene: PointScene, grid_size: float) -> GridSample:
    """Average the points of ``scene`` falling into each cube of side ``grid_size`` (metres).

    Cells are ordered by their first point, so the result does not depend on hashing.
    """
    if not grid_size > 0:
        raise PointDataError(f"grid_size must be > 0, got {grid_size}")
    if len(scene) == 0:
        return GridSample(scene, np.zeros(0, np.int64))
    cell = np.floor((scene.coord - scene.coord.min(0)) / grid_size).astype(np.int64)
    _, first, inverse = np.unique(cell, axis=0, return_index=True, return_inverse=True)
    inverse = inverse.reshape(-1)
    # renumber cells by first occurrence
    rank = np.empty_like(first)
    rank[np.argsort(first, kind="stable")] = np.arange(len(first))
    inverse = rank[inverse]
    first = np.sort(first)
    m = len(first)
    count = np.bincount(inverse, minlength=m).astype(np.float64)
    coord = (
        np.stack(
            [np.bincount(inverse, scene.coord[:, i].astype(np.float64), m) for i in range(3)], 1
        )
        / count[:, None]
    )
    color = (
        np.stack(
            [np.bincount(inverse, scene.color[:, i].astype(np.float64), m) for i in range(3)], 1
        )
        / count[:, None]
    )
    seg = scene.segment.astype(np.int64)
    labelled = seg != IGNORE_INDEX
    segment = np.full(m, IGNORE_INDEX, np.int16)
    if labelled.any():
        c = int(seg[labelled].max()) + 1
        votes = np.bincount(inverse[labelled] * c + seg[labelled], minlength=m * c).reshape(m, c)
        has = votes.sum(1) > 0
        segment[has] = votes[has].argmax(1)
    sub = PointScene(
        name=scene.name,
        coord=coord.astype(np.float32),
        color=np.clip(np.rint(color), 0, 255).astype(np.uint8),
        segment=segment,
        instance=scene.instance[first],
    )
    return GridSample(sub, inverse)
