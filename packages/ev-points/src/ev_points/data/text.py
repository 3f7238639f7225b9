"""Fast parsing of whitespace-separated numeric text files, with the failing line on error."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ev_points.data.scene import PointDataError

__all__ = ["read_xyzrgb"]


def read_xyzrgb(path: Path) -> np.ndarray:
    """Read ``x y z r g b`` lines (S3DIS) into a ``[P, 6]`` float64 array.

    Raises:
        PointDataError: a line does not hold exactly 6 finite numbers, or colours are outside
            0..255; the message names the file and the line.
    """
    try:
        raw = path.read_bytes()
    except IsADirectoryError as exc:
        raise PointDataError("expected a text file, found a folder", path=path) from exc
    try:
        text = raw.decode("ascii")
        values = np.array(text.split(), dtype=np.float64)
        lines = [ln for ln in text.splitlines() if ln.strip()]
        ok = values.size == 6 * len(lines)
    except (UnicodeDecodeError, ValueError):
        ok = False
    if not ok:
        _locate_bad_line(path, raw)
    arr = values.reshape(-1, 6)
    if not np.isfinite(arr).all():
        bad = int(np.nonzero(~np.isfinite(arr).all(1))[0][0])
        raise PointDataError("non-finite value", path=path, line=_nth_data_line(raw, bad))
    col = arr[:, 3:]
    if ((col < 0) | (col > 255)).any():
        bad = int(np.nonzero(((col < 0) | (col > 255)).any(1))[0][0])
        raise PointDataError("colour outside 0..255", path=path, line=_nth_data_line(raw, bad))
    return arr


def _nth_data_line(raw: bytes, n: int) -> int:
    seen = -1
    for number, line in enumerate(raw.splitlines(), 1):
        if line.strip():
            seen += 1
            if seen == n:
                return number
    return 0


def _locate_bad_line(path: Path, raw: bytes) -> None:
    for number, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            fields = line.decode("ascii").split()
            [float(f) for f in fields]
        except (UnicodeDecodeError, ValueError):
            raise PointDataError(f"not numbers: {line[:60]!r}", path=path, line=number) from None
        if len(fields) != 6:
            raise PointDataError(
                f"expected 6 values (x y z r g b), got {len(fields)}", path=path, line=number
            )
    raise PointDataError("unreadable point file", path=path)  # pragma: no cover
