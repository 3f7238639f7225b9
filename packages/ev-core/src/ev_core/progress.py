"""One progress-bar wrapper over tqdm for every ev package.

Bars are silenced by ``--quiet`` on any ev CLI (which calls :func:`set_quiet`), by the
environment variable ``EV_QUIET=1``, and on every distributed rank but 0.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")

_QUIET: bool | None = None
_TRUTHY = {"1", "true", "yes", "on"}


def set_quiet(quiet: bool | None) -> None:
    """Force progress output off (``True``) or on (``False``); ``None`` defers to ``EV_QUIET``."""
    global _QUIET
    _QUIET = quiet


def is_quiet() -> bool:
    """Whether progress output is silenced (``set_quiet``, ``EV_QUIET`` or a non-zero rank)."""
    if _QUIET is not None:
        return _QUIET
    if os.environ.get("EV_QUIET", "").strip().lower() in _TRUTHY:
        return True
    return os.environ.get("RANK", "0") not in ("", "0")


def progress(
    iterable: Iterable[T] | None = None,
    *,
    desc: str | None = None,
    total: int | None = None,
    leave: bool = False,
    **kwargs: Any,
) -> tqdm[T]:
    """A tqdm bar that honours :func:`is_quiet`; usable as an iterator or a context manager."""
    return tqdm(
        iterable,
        desc=desc,
        total=total,
        leave=leave,
        disable=is_quiet(),
        dynamic_ncols=True,
        **kwargs,
    )
