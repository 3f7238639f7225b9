"""S3DIS (Stanford Large-Scale 3D Indoor Spaces) in its raw release layout.

``<root>/Area_{1..6}/<room>/<room>.txt`` holds the room's ``x y z r g b`` lines and
``<root>/Area_N/<room>/Annotations/<class>_<i>.txt`` one file per object instance. Points and
labels are read from the annotation files (their union is the room); an object class outside
the 13 benchmark classes (e.g. ``stairs``) becomes ``clutter``. Splits: test on Area 5, train on
the others, or 6-fold cross-validation over the areas.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ev_points.data.scene import PointDataError, PointScene
from ev_points.data.text import read_xyzrgb

__all__ = [
    "S3DIS_CLASSES",
    "list_s3dis_rooms",
    "read_s3dis_room",
    "s3dis_area_split",
    "s3dis_six_fold",
]

S3DIS_CLASSES = (
    "ceiling", "floor", "wall", "beam", "column", "window", "door",
    "table", "chair", "sofa", "bookcase", "board", "clutter",
)  # fmt: skip
_CLASS_INDEX = {name: i for i, name in enumerate(S3DIS_CLASSES)}
_ANNOTATION = re.compile(r"^(?P<cls>[A-Za-z]+)_(?P<inst>\d+)\.txt$")
_AREA = re.compile(r"^Area_([1-6])$")


def list_s3dis_rooms(root: str | Path, areas: tuple[int, ...] = (1, 2, 3, 4, 5, 6)) -> list[Path]:
    """Room folders of the given areas, sorted (``Area_1/conferenceRoom_1``, ...).

    Raises:
        PointDataError: ``root`` or an ``Area_N`` folder is missing, or an area has no rooms.
    """
    root = Path(root)
    if not root.is_dir():
        raise PointDataError("S3DIS root folder not found", path=root)
    rooms: list[Path] = []
    for area in areas:
        area_dir = root / f"Area_{area}"
        if not area_dir.is_dir():
            raise PointDataError(
                f"missing Area_{area} (expected <root>/Area_N/<room>/<room>.txt)", path=area_dir
            )
        found = sorted(d for d in area_dir.iterdir() if d.is_dir() and (d / "Annotations").is_dir())
        if not found:
            raise PointDataError("no room folders with an Annotations/ folder", path=area_dir)
        rooms.extend(found)
    return rooms


def read_s3dis_room(room_dir: str | Path) -> PointScene:
    """Read one raw S3DIS room.

    Returns:
        A :class:`PointScene` named ``Area_N/<room>``, with class indices into
        :data:`S3DIS_CLASSES` and one instance id per annotation file.

    Raises:
        PointDataError: missing ``<room>.txt`` / ``Annotations``, a badly named annotation
            file, or a malformed line (the message names the file and line).
    """
    room_dir = Path(room_dir)
    room_txt = room_dir / f"{room_dir.name}.txt"
    ann_dir = room_dir / "Annotations"
    if not room_txt.is_file():
        raise PointDataError(f"missing the room file {room_txt.name}", path=room_txt)
    if not ann_dir.is_dir():
        raise PointDataError("missing the Annotations folder", path=ann_dir)
    files = sorted(p for p in ann_dir.iterdir() if p.suffix == ".txt")
    if not files:
        raise PointDataError("no <class>_<i>.txt annotation files", path=ann_dir)
    coords, colors, segs, insts = [], [], [], []
    for inst, path in enumerate(files):
        m = _ANNOTATION.match(path.name)
        if m is None:
            raise PointDataError("annotation file name is not <class>_<i>.txt", path=path)
        cls = _CLASS_INDEX.get(m["cls"], _CLASS_INDEX["clutter"])
        arr = read_xyzrgb(path)
        coords.append(arr[:, :3].astype(np.float32))
        colors.append(arr[:, 3:].astype(np.uint8))
        segs.append(np.full(len(arr), cls, np.int16))
        insts.append(np.full(len(arr), inst, np.int16))
    return PointScene(
        name=f"{room_dir.parent.name}/{room_dir.name}",
        coord=np.concatenate(coords),
        color=np.concatenate(colors),
        segment=np.concatenate(segs),
        instance=np.concatenate(insts),
    )


def s3dis_area_split(root: str | Path, test_area: int = 5) -> tuple[list[Path], list[Path]]:
    """``(train_rooms, test_rooms)``: test on ``test_area`` (5 by convention), train on the rest."""
    if test_area not in range(1, 7):
        raise PointDataError(f"test_area must be 1..6, got {test_area}")
    train = list_s3dis_rooms(root, tuple(a for a in range(1, 7) if a != test_area))
    return train, list_s3dis_rooms(root, (test_area,))


def s3dis_six_fold(root: str | Path) -> Iterator[tuple[int, list[Path], list[Path]]]:
    """6-fold cross-validation: ``(test_area, train_rooms, test_rooms)`` for areas 1..6."""
    for area in range(1, 7):
        yield (area, *s3dis_area_split(root, area))
