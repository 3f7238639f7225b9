"""JSON-friendly conversion and atomic file writes shared by every ev package."""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any


def _read_umask() -> int:
    mask = os.umask(0)  # the only portable way to read it; done once, at import
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def to_jsonable(obj: Any) -> Any:
    """Convert dataclasses, paths, enums, tuples, numpy/torch scalars to JSON-compatible values.

    Raises:
        TypeError: for objects with no faithful JSON representation (e.g. tensors with
            more than one element), so that nothing is silently lost from a dumped config.
    """
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        items = sorted(obj, key=repr) if isinstance(obj, (set, frozenset)) else obj
        return [to_jsonable(v) for v in items]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, enum.Enum):
        return to_jsonable(obj.value)
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    item = getattr(obj, "item", None)  # numpy / torch scalars
    if callable(item) and getattr(obj, "ndim", 0) == 0:
        return item()
    if callable(getattr(obj, "tolist", None)):
        return obj.tolist()
    raise TypeError(f"cannot convert {type(obj).__name__} to JSON")


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], None]) -> Path:
    """Write a file atomically: ``write(tmp_path)`` then rename over ``path``.

    The temporary file lives in the destination folder so the final :func:`os.replace` is
    atomic; a crash mid-write leaves the previous file (if any) untouched and no partial file.

    Args:
        path: destination file.
        write: callable that writes the complete content to the temporary path it receives.

    Returns:
        The destination path.
    """
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        # mkstemp creates 0600 (and writers may recreate the file): give the usual file mode
        os.chmod(tmp, 0o666 & ~_UMASK)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return dest


def write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """Atomically write ``obj`` (converted by :func:`to_jsonable`) as indented JSON."""
    text = json.dumps(to_jsonable(obj), indent=2, sort_keys=False) + "\n"

    def write(p: Path) -> None:
        p.write_text(text, encoding="utf-8")

    return atomic_write(path, write)
