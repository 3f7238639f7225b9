"""Checks run before expensive work: every image readable, the index backend installed.

:func:`validate_images` reads each image's header and, for JPEG and PNG, the end-of-image
marker at the file's tail (a truncated file fails here, not in a DataLoader worker at the end of
a run); every bad file is reported at once with its path. :func:`check_index_backend` resolves
the retrieval backend before any feature is extracted.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from ev_core.errors import EvError, MissingDependencyError
from ev_reid.datasets.torch_dataset import ImageReadError
from ev_reid.records import ReidRecord

if TYPE_CHECKING:
    from ev_reid.retrieval import IndexBackend, IndexConfig

__all__ = ["check_image", "check_index_backend", "validate_images"]

_TAIL_BYTES = 1024
_LISTED = 10


def check_image(path: str | os.PathLike[str]) -> str | None:
    """What is wrong with one image file, or ``None`` when its header and end look complete.

    Reads the header (format, size) and, for JPEG and PNG, checks the end-of-image marker
    (``FF D9`` / the ``IEND`` chunk) in the file's last KiB: cheap (no decoding) and enough to
    catch truncated files.
    """
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.is_file():
        return "missing" if not p.exists() else "not a file"
    try:
        size = p.stat().st_size
        if size == 0:
            return "empty file"
        with Image.open(p) as img:
            fmt = img.format
            w, h = img.size
        if w < 1 or h < 1:
            return f"image size {w}x{h}"
        with p.open("rb") as fh:
            fh.seek(max(0, size - _TAIL_BYTES))
            tail = fh.read()
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        return f"truncated or not an image ({exc})"
    if fmt == "JPEG" and not tail.rstrip(b"\x00\r\n\t ").endswith(b"\xff\xd9"):
        return "truncated JPEG (no end-of-image marker)"
    if fmt == "PNG" and b"IEND" not in tail:
        return "truncated PNG (no IEND chunk)"
    return None


def validate_images(images: Iterable[ReidRecord | str | os.PathLike[str]]) -> int:
    """Check every image before training or feature extraction; report all bad ones at once.

    Args:
        images: records or paths.

    Returns:
        The number of images checked.

    Raises:
        ImageReadError: listing every bad file with its path and what is wrong (the first
            line names up to 10 of them and the count).
    """
    from ev_core.progress import progress

    paths = [r.path if isinstance(r, ReidRecord) else os.fspath(r) for r in images]
    unique = list(dict.fromkeys(paths))
    bad: list[tuple[str, str]] = []
    for path in progress(unique, desc="check images", total=len(unique)):
        problem = check_image(path)
        if problem is not None:
            bad.append((path, problem))
    if bad:
        shown = "; ".join(f"{p}: {why}" for p, why in bad[:_LISTED])
        more = f"; and {len(bad) - _LISTED} more (listed below)" if len(bad) > _LISTED else ""
        lines = "\n".join(f"  {p}: {why}" for p, why in bad)
        raise ImageReadError(
            f"{len(bad)} of {len(unique)} images cannot be read: {shown}{more}\n{lines}"
        )
    return len(unique)


def check_index_backend(config: IndexConfig) -> IndexBackend:
    """Resolve the index backend of ``config`` now (before features are extracted).

    Raises:
        MissingDependencyError: when the backend needs faiss and it is not installed.
        EvError: when the backend cannot run for another reason (e.g. no CUDA device).
    """
    from ev_reid.retrieval import IndexBackend
    from ev_reid.retrieval.index import select_index_backend

    try:
        return select_index_backend(config)
    except RuntimeError as exc:
        wants_faiss = config.backend not in (IndexBackend.AUTO, IndexBackend.TORCH)
        if wants_faiss and "faiss not installed" in str(exc):
            raise MissingDependencyError(
                f"--backend {config.backend.value} needs faiss, which is not installed "
                "(pip install 'ev-reid[faiss]'), or use --backend torch"
            ) from exc
        raise EvError(str(exc)) from exc
