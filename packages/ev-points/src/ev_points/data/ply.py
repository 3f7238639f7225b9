"""A small PLY reader/writer for vertex data (ascii and binary, little/big endian).

Enough for ScanNet's ``_vh_clean_2.ply``: the ``vertex`` element (``x y z red green blue
[alpha]``) is read; elements after it (faces) are not parsed.
"""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

import numpy as np

from ev_points.data.scene import PointDataError

__all__ = ["read_ply_vertices", "write_ply_vertices"]

_TYPES = {
    "char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1",
    "short": "i2", "int16": "i2", "ushort": "u2", "uint16": "u2",
    "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4",
    "float": "f4", "float32": "f4", "double": "f8", "float64": "f8",
}  # fmt: skip


def _parse_header(
    path: Path, fh: BinaryIO
) -> tuple[str, list[tuple[str, int, list[tuple[str, str]]]], int]:
    first = fh.readline()
    if first.strip() != b"ply":
        raise PointDataError("not a PLY file (first line is not 'ply')", path=path, line=1)
    fmt = ""
    elements: list[tuple[str, int, list[tuple[str, str]]]] = []
    number = 1
    while True:
        raw = fh.readline()
        number += 1
        if not raw:
            raise PointDataError("PLY header has no end_header", path=path, line=number)
        try:
            words = raw.decode("ascii").split()
        except UnicodeDecodeError:
            raise PointDataError("non-ASCII PLY header line", path=path, line=number) from None
        if not words or words[0] in ("comment", "obj_info"):
            continue
        if words[0] == "end_header":
            break
        if words[0] == "format" and len(words) == 3:
            fmt = words[1]
        elif words[0] == "element" and len(words) == 3 and words[2].isdigit():
            elements.append((words[1], int(words[2]), []))
        elif words[0] == "property" and elements and len(words) == 3 and words[1] in _TYPES:
            elements[-1][2].append((words[2], _TYPES[words[1]]))
        elif words[0] == "property" and elements and len(words) == 5 and words[1] == "list":
            elements[-1][2].append((words[4], "list"))
        else:
            raise PointDataError(
                f"bad PLY header line {raw.strip()[:60]!r}", path=path, line=number
            )
    if fmt not in ("ascii", "binary_little_endian", "binary_big_endian"):
        raise PointDataError(f"unsupported PLY format {fmt!r}", path=path)
    return fmt, elements, number


def read_ply_vertices(path: str | Path) -> dict[str, np.ndarray]:
    """The ``vertex`` element of a PLY file as ``{property: [V] array}``.

    Raises:
        PointDataError: not a PLY file, unsupported format, no vertex element, a list property
            or an element before the vertices that cannot be skipped, truncated data.
    """
    path = Path(path)
    with path.open("rb") as fh:
        fmt, elements, header_lines = _parse_header(path, fh)
        if not elements or elements[0][0] != "vertex":
            raise PointDataError("the first PLY element must be 'vertex'", path=path)
        _, count, props = elements[0]
        if any(t == "list" for _, t in props) or not props:
            raise PointDataError("vertex element with list properties is not supported", path=path)
        names = [n for n, _ in props]
        if fmt == "ascii":
            out = {n: np.empty(count, t) for n, t in props}
            for i in range(count):
                raw = fh.readline()
                line = header_lines + 1 + i
                try:
                    vals = raw.decode("ascii").split()
                    if len(vals) != len(props):
                        raise ValueError(f"expected {len(props)} values, got {len(vals)}")
                    for (n, t), v in zip(props, vals, strict=True):
                        out[n][i] = np.array(float(v)).astype(t) if t[0] == "f" else int(v)
                except (UnicodeDecodeError, ValueError, OverflowError) as exc:
                    raise PointDataError(f"bad vertex line: {exc}", path=path, line=line) from None
            return out
        order = "<" if fmt == "binary_little_endian" else ">"
        dtype = np.dtype([(n, order + t) for n, t in props])
        data = fh.read(dtype.itemsize * count)
        if len(data) != dtype.itemsize * count:
            raise PointDataError(
                f"truncated PLY: {count} vertices need {dtype.itemsize * count} bytes, found {len(data)}",
                path=path,
            )
        arr = np.frombuffer(data, dtype=dtype)
        return {n: arr[n].astype(arr[n].dtype.newbyteorder("=")) for n in names}


def write_ply_vertices(
    path: str | Path,
    coord: np.ndarray,
    color: np.ndarray,
    *,
    faces: np.ndarray | None = None,
    ascii: bool = False,
) -> Path:
    """Write points (and optional triangle ``faces [F, 3]``) as a ScanNet-style PLY
    (``float x y z``, ``uchar red green blue alpha``, ``list uchar int vertex_indices``)."""
    path = Path(path)
    v = len(coord)
    dtype = np.dtype(
        [
            ("x", "<f4"),
            ("y", "<f4"),
            ("z", "<f4"),
            ("red", "u1"),
            ("green", "u1"),
            ("blue", "u1"),
            ("alpha", "u1"),
        ]
    )
    arr = np.empty(v, dtype)
    arr["x"], arr["y"], arr["z"] = coord[:, 0], coord[:, 1], coord[:, 2]
    arr["red"], arr["green"], arr["blue"] = color[:, 0], color[:, 1], color[:, 2]
    arr["alpha"] = 255
    faces = np.zeros((0, 3), np.int32) if faces is None else np.asarray(faces, np.int32)
    header = [
        "ply",
        f"format {'ascii' if ascii else 'binary_little_endian'} 1.0",
        f"element vertex {v}",
        "property float x", "property float y", "property float z",
        "property uchar red", "property uchar green", "property uchar blue", "property uchar alpha",
        f"element face {len(faces)}",
        "property list uchar int vertex_indices",
        "end_header",
    ]  # fmt: skip
    with path.open("wb") as fh:
        fh.write(("\n".join(header) + "\n").encode("ascii"))
        if ascii:
            for row in arr:
                fh.write((" ".join(str(x) for x in row.tolist()) + "\n").encode("ascii"))
            for f in faces:
                fh.write(f"3 {f[0]} {f[1]} {f[2]}\n".encode("ascii"))
        else:
            fh.write(arr.tobytes())
            fdt = np.dtype([("n", "u1"), ("v", "<i4", (3,))])
            farr = np.empty(len(faces), fdt)
            farr["n"], farr["v"] = 3, faces
            fh.write(farr.tobytes())
    return path
