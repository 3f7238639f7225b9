"""The error type every ev package raises for problems a user can fix.

A :class:`EvError` carries a message that names the file, option or value at fault. ev's
command-line tools print it as one line and exit with status 2 (``--debug`` or
``EV_DEBUG=1`` shows the traceback instead); anything else is a bug and keeps its traceback.
Packages derive their own errors from it (``VideoDecodeError``, ``DatasetLayoutError``, ...).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

__all__ = ["EvError", "MissingDependencyError", "require"]


class EvError(Exception):
    """A problem with the user's input, files or environment, described in its message.

    Args:
        message: what is wrong, naming the file/option/value.
        path: the file or folder at fault, when there is one (also named in ``str(err)``).
    """

    def __init__(self, message: str, path: str | os.PathLike[str] | None = None) -> None:
        self.path = Path(path) if path is not None else None
        if self.path is not None and str(self.path) not in message:
            message = f"{self.path}: {message}"
        super().__init__(message)


class MissingDependencyError(EvError):
    """An optional dependency is not installed; the message names the pip extra to install."""


def require(module: str, extra: str, distribution: str, purpose: str) -> Any:
    """Import an optional dependency or raise :class:`MissingDependencyError`.

    Call it before expensive work so that a missing backend is found at once.

    Args:
        module: the import name (``"faiss"``, ``"decord"``).
        extra: the pip extra that installs it (``"faiss"``).
        distribution: the ev distribution that declares the extra (``"ev-reid"``).
        purpose: what needs it, for the message (``"the faiss index backends"``).

    Returns:
        The imported module.
    """
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(
            f"{purpose} needs the Python module {module!r}, which is not installed "
            f"(pip install '{distribution}[{extra}]'): {exc}"
        ) from exc
