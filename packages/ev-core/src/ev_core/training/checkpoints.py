"""Checkpoints that are atomic as a set, with the previous good one kept until the new one is whole.

Layout under ``root`` (usually ``<out_dir>/checkpoints``)::

    step-00000120/          model.safetensors, model.json, [ema.safetensors], state.pt,
                            [state_rank<r>.pt], COMPLETE
    step-00000240/          ...
    latest                  one line: the name of the newest complete step folder

A checkpoint is first written to ``.step-XXXXXXXX.partial/``; the ``COMPLETE`` marker is
written last, then the folder is renamed into place and ``latest`` is replaced atomically.
A process killed at any point leaves every earlier complete checkpoint intact; the next
:meth:`CheckpointManager.cleanup` removes the leftovers.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

from ev_core.errors import EvError
from ev_core.io import atomic_write

__all__ = ["COMPLETE_MARKER", "CheckpointManager"]

COMPLETE_MARKER = "COMPLETE"
_STEP_DIR = re.compile(r"^step-(\d{8,})$")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some filesystems do not allow opening folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class CheckpointManager:
    """Writes, finds and prunes the step folders under ``root``.

    Args:
        root: the checkpoints folder.
        keep: how many complete checkpoints to keep (the newest).
    """

    def __init__(self, root: str | os.PathLike[str], keep: int = 2) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.root = Path(root)
        self.keep = keep

    @staticmethod
    def dir_name(step: int) -> str:
        """``step-00000042`` for step 42."""
        return f"step-{step:08d}"

    def partial_dir(self, step: int) -> Path:
        """Where checkpoint ``step`` is assembled before it is renamed into place."""
        return self.root / f".{self.dir_name(step)}.partial"

    # ------------------------------------------------------------------ discovery
    def complete(self) -> list[Path]:
        """Every complete step folder, oldest first."""
        if not self.root.is_dir():
            return []
        found = []
        for child in self.root.iterdir():
            match = _STEP_DIR.match(child.name)
            if match and child.is_dir() and (child / COMPLETE_MARKER).is_file():
                found.append((int(match.group(1)), child))
        return [p for _, p in sorted(found)]

    def latest(self) -> Path | None:
        """The newest complete checkpoint: ``latest``'s target when it is whole, else a scan."""
        pointer = self.root / "latest"
        if pointer.is_file():
            name = pointer.read_text(encoding="utf-8").strip()
            target = self.root / name
            if _STEP_DIR.match(name) and (target / COMPLETE_MARKER).is_file():
                newest = self.complete()
                # a newer complete folder can exist if the kill hit between rename and pointer
                return newest[-1] if newest and newest[-1] != target else target
        found = self.complete()
        return found[-1] if found else None

    @staticmethod
    def step_of(path: str | os.PathLike[str]) -> int:
        """The step number of a step folder.

        Raises:
            EvError: if ``path`` is not a step folder.
        """
        match = _STEP_DIR.match(Path(path).name)
        if not match:
            raise EvError("not a checkpoint folder (expected a name like step-00000042)", path=path)
        return int(match.group(1))

    # ------------------------------------------------------------------ writing
    def cleanup(self) -> list[Path]:
        """Remove partial folders, trash and temporary files left by an interrupted save.

        Returns:
            What was removed.
        """
        removed: list[Path] = []
        if not self.root.is_dir():
            return removed
        self._recover()
        for child in self.root.iterdir():
            name = child.name
            stale_dir = child.is_dir() and (
                name.endswith(".partial")
                or name.endswith(".trash")
                or (_STEP_DIR.match(name) is not None and not (child / COMPLETE_MARKER).is_file())
            )
            if stale_dir:
                shutil.rmtree(child, ignore_errors=True)
                removed.append(child)
            elif child.is_file() and name.startswith(".") and name.endswith(".tmp"):
                child.unlink(missing_ok=True)
                removed.append(child)
        return removed

    def _recover(self) -> None:
        """Put back a whole checkpoint that a kill left aside while the same step was re-saved.

        ``commit`` moves an existing ``step-N`` to ``.step-N.trash`` and then the new
        ``.step-N.partial`` (already marked complete) into place; a kill between the two renames
        leaves no ``step-N``. The complete new one is preferred, else the old one.
        """
        for suffix in (".partial", ".trash"):
            for child in sorted(self.root.glob(f".step-*{suffix}")):
                name = child.name[1 : -len(suffix)]
                final = self.root / name
                if (
                    _STEP_DIR.match(name)
                    and child.is_dir()
                    and (child / COMPLETE_MARKER).is_file()
                    and not final.exists()
                ):
                    child.rename(final)

    def discard_after(self, step: int) -> list[Path]:
        """Delete the complete checkpoints of steps after ``step`` (a run restarted from ``step``
        or from scratch makes them stale: kept, they would outrank the new run's checkpoints).

        Returns:
            What was deleted.
        """
        stale = [p for p in self.complete() if self.step_of(p) > step]
        pointer = self.root / "latest"
        if stale and pointer.is_file():
            pointer.unlink()
        for old in stale:
            shutil.rmtree(old, ignore_errors=True)
        return stale

    def begin(self, step: int) -> Path:
        """Create (empty) the partial folder for ``step`` and return it."""
        partial = self.partial_dir(step)
        if partial.exists():
            shutil.rmtree(partial)
        partial.mkdir(parents=True)
        return partial

    def commit(self, step: int) -> Path:
        """Mark the partial folder of ``step`` complete, move it into place, point ``latest`` at it.

        Returns:
            The final step folder.
        """
        partial = self.partial_dir(step)
        (partial / COMPLETE_MARKER).write_text(f"{step}\n", encoding="utf-8")
        _fsync_dir(partial)
        final = self.root / self.dir_name(step)
        trash = None
        if final.exists():  # the same step saved again (e.g. resumed and re-saved)
            trash = self.root / f".{final.name}.trash"
            if trash.exists():
                shutil.rmtree(trash)
            final.rename(trash)
        partial.rename(final)
        _fsync_dir(self.root)

        def write_pointer(tmp: Path) -> None:
            tmp.write_text(final.name + "\n", encoding="utf-8")

        atomic_write(self.root / "latest", write_pointer)
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
        self.prune()
        return final

    def save(self, step: int, write: Callable[[Path], None]) -> Path:
        """Single-process convenience: :meth:`begin`, ``write(folder)``, :meth:`commit`."""
        folder = self.begin(step)
        write(folder)
        return self.commit(step)

    def prune(self) -> None:
        """Delete complete checkpoints beyond the newest ``keep``."""
        found = self.complete()
        for old in found[: max(0, len(found) - self.keep)]:
            shutil.rmtree(old, ignore_errors=True)
