"""ScanNet v2 scenes in the official release layout, with the 20-class benchmark labels.

Per scene folder ``<root>/scans/<scene>/`` (or ``<root>/<scene>/``):

* ``<scene>_vh_clean_2.ply`` -- the mesh vertices (the points), with colours;
* ``<scene>_vh_clean_2.0.010000.segs.json`` -- ``segIndices``: one over-segment id per vertex;
* ``<scene>.aggregation.json`` (or ``<scene>_vh_clean.aggregation.json``) -- ``segGroups``: object
  instances as lists of segment ids with a raw category ``label``;
* ``scannetv2-labels.combined.tsv`` at the root maps raw categories to NYU40 ids (columns
  ``raw_category`` and ``nyu40id``).

NYU40 ids outside the 20 evaluation classes, and vertices in no object, get label -1 (ignored).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from ev_points.data.ply import read_ply_vertices
from ev_points.data.scene import IGNORE_INDEX, PointDataError, PointScene

__all__ = [
    "LABEL_MAP_FILE",
    "SCANNET20_CLASSES",
    "SCANNET20_NYU40_IDS",
    "list_scannet_scenes",
    "nyu40_to_scannet20",
    "read_label_map",
    "read_scannet_scene",
]

SCANNET20_NYU40_IDS = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 14, 16, 24, 28, 33, 34, 36, 39)
SCANNET20_CLASSES = (
    "wall", "floor", "cabinet", "bed", "chair", "sofa", "table", "door", "window", "bookshelf",
    "picture", "counter", "desk", "curtain", "refrigerator", "shower curtain", "toilet", "sink",
    "bathtub", "otherfurniture",
)  # fmt: skip
LABEL_MAP_FILE = "scannetv2-labels.combined.tsv"

_NYU40_TO_20 = np.full(41, IGNORE_INDEX, dtype=np.int16)
_NYU40_TO_20[list(SCANNET20_NYU40_IDS)] = np.arange(20, dtype=np.int16)


def nyu40_to_scannet20(nyu40: np.ndarray) -> np.ndarray:
    """Map NYU40 ids (0..40) to the 20 benchmark classes (0..19) or -1."""
    nyu40 = np.asarray(nyu40)
    out = np.full(nyu40.shape, IGNORE_INDEX, dtype=np.int16)
    ok = (nyu40 >= 0) & (nyu40 <= 40)
    out[ok] = _NYU40_TO_20[nyu40[ok]]
    return out


def read_label_map(path: str | Path) -> dict[str, int]:
    """``raw_category -> nyu40id`` from ``scannetv2-labels.combined.tsv``."""
    path = Path(path)
    if not path.is_file():
        raise PointDataError(f"missing the ScanNet label map {LABEL_MAP_FILE}", path=path)
    with path.open(newline="", encoding="utf-8", errors="replace") as fh:
        reader = csv.reader(fh, delimiter="\t")
        header = next(reader, None)
        if not header or "raw_category" not in header or "nyu40id" not in header:
            raise PointDataError(
                "label map needs the columns raw_category and nyu40id", path=path, line=1
            )
        rc, ny = header.index("raw_category"), header.index("nyu40id")
        mapping: dict[str, int] = {}
        for number, row in enumerate(reader, 2):
            if not row:
                continue
            try:
                mapping[row[rc]] = int(row[ny])
            except (IndexError, ValueError):
                raise PointDataError(
                    "bad row (raw_category / nyu40id)", path=path, line=number
                ) from None
    return mapping


def _load_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PointDataError("missing file", path=path) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        line = getattr(exc, "lineno", None)
        raise PointDataError(f"invalid JSON ({exc})", path=path, line=line) from None
    if not isinstance(data, dict):
        raise PointDataError("expected a JSON object", path=path)
    return data


def list_scannet_scenes(root: str | Path, split_file: str | Path | None = None) -> list[Path]:
    """Scene folders under ``root/scans`` (or ``root``), optionally those named in a split file
    (``scannetv2_train.txt``: one scene id per line)."""
    root = Path(root)
    base = root / "scans" if (root / "scans").is_dir() else root
    if not base.is_dir():
        raise PointDataError("ScanNet root folder not found", path=root)
    if split_file is not None:
        split_path = Path(split_file)
        if not split_path.is_file():
            raise PointDataError("split file not found", path=split_path)
        names = [ln.strip() for ln in split_path.read_text().splitlines() if ln.strip()]
        missing = [n for n in names if not (base / n).is_dir()]
        if missing:
            raise PointDataError(
                f"{len(missing)} scenes of the split are missing, e.g. {missing[0]}", path=base
            )
        return [base / n for n in names]
    scenes = sorted(
        d for d in base.iterdir() if d.is_dir() and (d / f"{d.name}_vh_clean_2.ply").is_file()
    )
    if not scenes:
        raise PointDataError("no scene folders with <scene>_vh_clean_2.ply", path=base)
    return scenes


def read_scannet_scene(scene_dir: str | Path, label_map: dict[str, int] | str | Path) -> PointScene:
    """Read one ScanNet v2 scene: vertices, colours, 20-class labels and instance ids.

    Args:
        scene_dir: ``.../scans/scene0000_00``.
        label_map: the ``raw_category -> nyu40id`` mapping or the path of the tsv.

    Raises:
        PointDataError: a missing or malformed file (named), segment ids that do not cover the
            vertices, or an aggregation that references unknown segments.
    """
    scene_dir = Path(scene_dir)
    name = scene_dir.name
    if not isinstance(label_map, dict):
        label_map = read_label_map(label_map)
    ply = scene_dir / f"{name}_vh_clean_2.ply"
    if not ply.is_file():
        raise PointDataError("missing the mesh file", path=ply)
    verts = read_ply_vertices(ply)
    for key in ("x", "y", "z", "red", "green", "blue"):
        if key not in verts:
            raise PointDataError(f"PLY vertices lack the property {key!r}", path=ply)
    coord = np.stack([verts["x"], verts["y"], verts["z"]], 1).astype(np.float32)
    color = np.stack([verts["red"], verts["green"], verts["blue"]], 1)
    if not np.isfinite(coord).all():
        raise PointDataError("non-finite vertex coordinates", path=ply)
    segs_path = scene_dir / f"{name}_vh_clean_2.0.010000.segs.json"
    seg_indices = _load_json(segs_path).get("segIndices")
    if not isinstance(seg_indices, list) or len(seg_indices) != len(coord):
        got = len(seg_indices) if isinstance(seg_indices, list) else type(seg_indices).__name__
        raise PointDataError(
            f"segIndices must list one id per vertex ({len(coord)}), got {got}", path=segs_path
        )
    try:
        seg = np.asarray(seg_indices, dtype=np.int64)
    except (TypeError, ValueError, OverflowError):
        raise PointDataError("segIndices must be integers", path=segs_path) from None
    agg_path = scene_dir / f"{name}.aggregation.json"
    if not agg_path.is_file():
        agg_path = scene_dir / f"{name}_vh_clean.aggregation.json"
    groups = _load_json(agg_path).get("segGroups")
    if not isinstance(groups, list):
        raise PointDataError("no segGroups list", path=agg_path)
    segment = np.full(len(coord), IGNORE_INDEX, np.int16)
    instance = np.full(len(coord), -1, np.int16)
    known = set(np.unique(seg).tolist())
    order = np.argsort(seg, kind="stable")
    sorted_seg = seg[order]
    for i, group in enumerate(groups):
        if not isinstance(group, dict) or not isinstance(group.get("segments"), list):
            raise PointDataError(f"segGroups[{i}] needs a 'segments' list", path=agg_path)
        label = group.get("label")
        if not isinstance(label, str):
            raise PointDataError(f"segGroups[{i}] needs a string 'label'", path=agg_path)
        try:
            ids = np.asarray(group["segments"], dtype=np.int64)
        except (TypeError, ValueError, OverflowError):
            raise PointDataError(
                f"segGroups[{i}].segments must be integers", path=agg_path
            ) from None
        unknown = [s for s in ids.tolist() if s not in known]
        if unknown:
            raise PointDataError(
                f"segGroups[{i}] references segment {unknown[0]} absent from {segs_path.name}",
                path=agg_path,
            )
        lo = np.searchsorted(sorted_seg, ids, "left")
        hi = np.searchsorted(sorted_seg, ids, "right")
        members = (
            np.concatenate([order[a:b] for a, b in zip(lo, hi, strict=True)])
            if len(ids)
            else np.zeros(0, np.int64)
        )
        nyu = label_map.get(label, 0)
        segment[members] = nyu40_to_scannet20(np.array([nyu]))[0]
        instance[members] = i
    return PointScene(name=name, coord=coord, color=color, segment=segment, instance=instance)
