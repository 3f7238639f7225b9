"""The preprocessed cache: one ``.npz`` per scene (grid-subsampled), plus ``meta.json``.

Reading raw S3DIS text or ScanNet meshes each epoch is slow; :func:`preprocess` converts a list
of scenes once and :func:`load_cache` reads them back. The cache records its source and grid
size; a scene already present with the same settings is skipped (rerun-safe).
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from ev_core.io import atomic_write, write_json
from ev_core.progress import progress
from ev_points.data.grid import grid_subsample
from ev_points.data.scene import PointDataError, PointScene

__all__ = ["CACHE_VERSION", "load_cache", "load_cached_scene", "preprocess", "save_scene"]

CACHE_VERSION = 1


def _file_name(name: str) -> str:
    return name.replace("/", "__") + ".npz"


def save_scene(path: Path, scene: PointScene) -> Path:
    """Write ``scene`` as an ``.npz`` (atomically)."""

    def write(tmp: Path) -> None:
        buf = io.BytesIO()
        np.savez(buf, name=np.array(scene.name), coord=scene.coord, color=scene.color,
                 segment=scene.segment, instance=scene.instance)  # fmt: skip
        tmp.write_bytes(buf.getvalue())

    return atomic_write(path, write)


def load_cached_scene(path: str | Path) -> PointScene:
    """Read one cached scene written by :func:`save_scene`."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            return PointScene(str(z["name"]), z["coord"], z["color"], z["segment"], z["instance"])
    except (OSError, KeyError, ValueError) as exc:
        raise PointDataError(f"not a readable ev-points cache file ({exc})", path=path) from None


def preprocess(
    sources: Sequence[Path],
    reader: Callable[[Path], PointScene],
    out_dir: str | Path,
    *,
    grid_size: float | None,
    dataset: str,
) -> list[Path]:
    """Read each source with ``reader``, grid-subsample it and cache it under ``out_dir``.

    Args:
        sources: room / scene folders.
        reader: e.g. :func:`~ev_points.data.read_s3dis_room`.
        out_dir: cache folder (created).
        grid_size: cell size in metres (None = keep every point).
        dataset: name recorded in ``meta.json`` (``"s3dis"``, ``"scannet"``).

    Returns:
        The cached ``.npz`` paths, in the order of ``sources``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta_path = out / "meta.json"
    meta = {"version": CACHE_VERSION, "dataset": dataset, "grid_size": grid_size}
    if meta_path.is_file():
        old = json.loads(meta_path.read_text())
        if {k: old.get(k) for k in meta} != meta:
            raise PointDataError(
                f"cache was built with {old}, not {meta}; use another folder", path=meta_path
            )
    write_json(meta_path, meta)
    paths = []
    for src in progress(list(sources), desc=f"preprocess {dataset}"):
        target = out / _file_name(
            f"{Path(src).parent.name}/{Path(src).name}" if dataset == "s3dis" else Path(src).name
        )
        if not target.is_file():
            scene = reader(Path(src))
            if grid_size is not None:
                scene = grid_subsample(scene, grid_size).scene
            save_scene(target, scene)
        paths.append(target)
    return paths


def load_cache(cache_dir: str | Path) -> list[PointScene]:
    """Every scene of a cache folder, sorted by file name."""
    cache_dir = Path(cache_dir)
    if not (cache_dir / "meta.json").is_file():
        raise PointDataError(
            "not an ev-points cache (no meta.json); run `ev-points preprocess`", path=cache_dir
        )
    return [load_cached_scene(p) for p in sorted(cache_dir.glob("*.npz"))]
