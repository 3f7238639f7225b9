"""Base class, errors and parsing helpers shared by every re-id dataset.

A dataset is three lists of :class:`~ev_reid.records.ReidRecord` (``train``, ``query``,
``gallery``), parsed eagerly from the official folder layout. Conventions (SYSTEMS.md §3.2):

- pid ``-1`` is **junk** and dropped at load; pid ``0`` is a Market-style **distractor**, kept in
  the gallery only;
- training pids are relabelled ``0..N-1`` through a **sorted** map (deterministic); query and
  gallery keep the raw pids so that they match each other;
- camera ids are **0-based**.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import ClassVar

from ev_core.errors import EvError
from ev_reid.records import ReidRecord

__all__ = [
    "IMAGE_EXTENSIONS",
    "CombinedDataset",
    "DatasetLayoutError",
    "ReidDataset",
    "combine_datasets",
    "find_dataset_dir",
    "list_images",
    "parse_int",
    "parse_market_style",
    "read_text_lines",
    "relabel",
]

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif"})
"""File suffixes (lower case) treated as images when a folder is scanned."""

JUNK_PID = -1
DISTRACTOR_PID = 0


class DatasetLayoutError(EvError, ValueError):
    """A dataset is missing or does not follow its official layout / naming scheme.

    The message names the offending path and, when given, the expected layout.

    Args:
        message: what is wrong.
        path: the offending file or folder.
        expected: a description of the expected layout (printed on its own lines).
    """

    def __init__(
        self, message: str, *, path: str | os.PathLike[str] | None = None, expected: str = ""
    ) -> None:
        self.path = None if path is None else Path(path)
        self.expected = expected
        text = message if path is None else f"{message}: {path}"
        if expected:
            text += "\nExpected layout:\n" + expected.rstrip()
        super().__init__(text, path)


def find_dataset_dir(
    root: str | os.PathLike[str],
    candidates: Sequence[str],
    is_valid: Callable[[Path], bool],
    *,
    name: str,
    expected: str,
) -> Path:
    """Return the first ``root / candidate`` for which ``is_valid`` holds.

    Lets users pass either the folder holding the dataset or the dataset folder itself.

    Raises:
        DatasetLayoutError: listing every folder tried and the expected layout.
    """
    root = Path(root).expanduser()
    tried = [root / c if c else root for c in candidates]
    for path in tried:
        if path.is_dir() and is_valid(path):
            return path
    where = ", ".join(str(p) for p in tried)
    if not root.exists():
        raise DatasetLayoutError(
            f"{name}: dataset root does not exist", path=root, expected=expected
        )
    raise DatasetLayoutError(
        f"{name}: no folder with the expected layout under {root} (tried {where})",
        path=root,
        expected=expected,
    )


def list_images(directory: Path, *, expected: str) -> list[Path]:
    """Sorted image files in ``directory`` (by :data:`IMAGE_EXTENSIONS`; other files ignored).

    Raises:
        DatasetLayoutError: if the folder is missing or holds no image.
    """
    if not directory.is_dir():
        raise DatasetLayoutError("missing folder", path=directory, expected=expected)
    files = sorted(
        p for p in directory.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
    )
    if not files:
        raise DatasetLayoutError("folder holds no image", path=directory, expected=expected)
    return files


_INT = re.compile(r"-?[0-9]+")


def parse_int(text: str) -> int | None:
    """``int(text)`` for plain ASCII integers (``-12``, ``0003``), else ``None``.

    Stricter than ``int()``/``str.isdigit()``, which accept ``"²"``, ``"٣"`` or ``" 1_0"``.
    """
    return int(text) if _INT.fullmatch(text) else None


def read_text_lines(path: Path, *, expected: str) -> list[str]:
    """The lines of a UTF-8 list file.

    Raises:
        DatasetLayoutError: naming ``path`` if it is missing, unreadable or not UTF-8 text.
    """
    if not path.is_file():
        raise DatasetLayoutError("missing list file", path=path, expected=expected)
    try:
        return path.read_bytes().decode("utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise DatasetLayoutError(
            f"not a UTF-8 text file (byte {exc.start})", path=path, expected=expected
        ) from None
    except OSError as exc:
        raise DatasetLayoutError(
            f"cannot read ({exc.strerror})", path=path, expected=expected
        ) from None


def relabel(records: Iterable[ReidRecord]) -> list[ReidRecord]:
    """Map pids to ``0..N-1`` in sorted order of the original pids (deterministic)."""
    records = list(records)
    mapping = {pid: i for i, pid in enumerate(sorted({r.pid for r in records}))}
    return [ReidRecord(r.path, mapping[r.pid], r.camid, r.dsetid) for r in records]


def _check_split(records: list[ReidRecord], split: str) -> None:
    for r in records:
        if r.camid < 0:
            raise DatasetLayoutError(f"negative camera id {r.camid} in {split}", path=r.path)
        if r.pid == JUNK_PID:
            raise DatasetLayoutError(f"junk pid -1 left in {split}", path=r.path)


class ReidDataset:
    """A re-id dataset: ``train``, ``query`` and ``gallery`` lists of records.

    Subclasses parse their layout and call ``super().__init__``. Training pids must already be
    ``0..N-1`` (use :func:`relabel`).

    Args:
        train: training records (pids ``0..N-1``).
        query: query records (raw pids).
        gallery: gallery records (raw pids; ``0`` = distractor where the dataset has them).
        dataset_dir: the folder the dataset was read from.
        combineall: also train on query + gallery (as torchreid's ``combineall``): their
            identities, distractors excluded, are relabelled after the training ones.
        verbose: print :meth:`summary` after loading.
    """

    name: ClassVar[str] = "dataset"
    layout: ClassVar[str] = ""
    _has_distractors: ClassVar[bool] = False
    """Whether pid 0 means "distractor" in this dataset's query/gallery."""

    @property
    def use_metric_cuhk03(self) -> bool:
        """Whether this split is scored with CUHK03's classic single-gallery-shot CMC
        (``evaluate_rank(..., use_metric_cuhk03=True)``) rather than the Market protocol."""
        return False

    def __init__(
        self,
        train: Sequence[ReidRecord],
        query: Sequence[ReidRecord],
        gallery: Sequence[ReidRecord],
        *,
        dataset_dir: str | os.PathLike[str],
        combineall: bool = False,
        verbose: bool = False,
    ) -> None:
        self.train = list(train)
        self.query = list(query)
        self.gallery = list(gallery)
        self.dataset_dir = Path(dataset_dir)
        for split, recs in (
            ("train", self.train),
            ("query", self.query),
            ("gallery", self.gallery),
        ):
            _check_split(recs, split)
        train_pids = sorted({r.pid for r in self.train})
        if train_pids != list(range(len(train_pids))):
            raise ValueError(f"{self.name}: training pids must be 0..N-1 (use relabel())")
        if combineall:
            self._combine_all()
        if verbose:
            print(self.summary())

    def _combine_all(self) -> None:
        seen = {r.path for r in self.train}
        extra = []
        for r in self.query + self.gallery:
            if (r.pid == DISTRACTOR_PID and self._has_distractors) or r.path in seen:
                continue
            seen.add(r.path)
            extra.append(r)
        offset = self.num_train_pids
        self.train += [
            ReidRecord(r.path, r.pid + offset, r.camid, r.dsetid) for r in relabel(extra)
        ]

    @staticmethod
    def _count(records: Sequence[ReidRecord]) -> tuple[int, int, int]:
        return len({r.pid for r in records}), len(records), len({r.camid for r in records})

    @property
    def num_train_pids(self) -> int:
        """Number of training identities."""
        return len({r.pid for r in self.train})

    @property
    def num_train_cams(self) -> int:
        """Number of cameras seen in the training split."""
        return len({r.camid for r in self.train})

    @property
    def num_query_pids(self) -> int:
        """Number of query identities."""
        return len({r.pid for r in self.query})

    @property
    def num_gallery_pids(self) -> int:
        """Number of gallery identities (distractor pid 0 counted as one where present)."""
        return len({r.pid for r in self.gallery})

    def verify_files(self) -> None:
        """Check that every image file exists.

        Raises:
            DatasetLayoutError: naming the first missing file and how many are missing.
        """
        missing = [
            r.path for r in self.train + self.query + self.gallery if not os.path.isfile(r.path)
        ]
        if missing:
            raise DatasetLayoutError(
                f"{self.name}: {len(missing)} image file(s) listed but missing, the first",
                path=missing[0],
                expected=self.layout,
            )

    def summary(self) -> str:
        """A torchreid-style table of identities / images / cameras per split."""
        rows = [("train", *self._count(self.train))]
        rows += [("query", *self._count(self.query)), ("gallery", *self._count(self.gallery))]
        lines = [
            f"=> {self.name} ({self.dataset_dir})",
            "  ----------------------------------------",
            "  subset   | # ids | # images | # cameras",
            "  ----------------------------------------",
        ]
        lines += [f"  {s:<8} | {p:5d} | {n:8d} | {c:9d}" for s, p, n, c in rows]
        lines.append("  ----------------------------------------")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self.summary()


class CombinedDataset(ReidDataset):
    """Several datasets' training splits merged for multi-source training.

    Built by :func:`combine_datasets`; query and gallery are empty (evaluate per dataset).

    Attributes:
        sources: the names of the merged datasets; record ``dsetid`` indexes this list.
    """

    name = "combined"

    def __init__(
        self, train: Sequence[ReidRecord], sources: Sequence[str], dataset_dir: Path
    ) -> None:
        self.sources = list(sources)
        super().__init__(train, [], [], dataset_dir=dataset_dir)


def combine_datasets(datasets: Sequence[ReidDataset]) -> CombinedDataset:
    """Merge the training splits of ``datasets`` for multi-source training.

    Dataset ``i``'s pids and camera ids are offset past those of datasets ``0..i-1`` (so that
    identities and cameras of different sources never collide) and its records get
    ``dsetid = i``. Query and gallery are left empty: evaluate on each source separately.

    Raises:
        ValueError: if ``datasets`` is empty.
    """
    if not datasets:
        raise ValueError("combine_datasets needs at least one dataset")
    train: list[ReidRecord] = []
    pid_offset = cam_offset = 0
    for i, ds in enumerate(datasets):
        cams = {c: j for j, c in enumerate(sorted({r.camid for r in ds.train}))}
        train += [
            ReidRecord(r.path, r.pid + pid_offset, cams[r.camid] + cam_offset, i) for r in ds.train
        ]
        pid_offset += ds.num_train_pids
        cam_offset += len(cams)
    return CombinedDataset(train, [ds.name for ds in datasets], datasets[0].dataset_dir)


def parse_market_style(
    directory: Path,
    *,
    split: str,
    expected: str,
    pattern: re.Pattern[str],
    cam_map: Callable[[int, Path], int],
    pid_check: Callable[[int, Path], None] | None = None,
) -> list[ReidRecord]:
    """Parse a Market-style folder (``<pid>_c<cam>...``) into records with raw pids.

    Junk (pid -1) is dropped everywhere; distractors (pid 0) are kept in the gallery only.

    Args:
        directory: the folder (e.g. ``bounding_box_train``).
        split: ``"train"``, ``"query"`` or ``"gallery"``.
        expected: the dataset's layout text, for errors.
        pattern: regex matched at the start of the file name with groups (pid, camera).
        cam_map: maps the camera number in the name to the 0-based camera id (raises on
            unknown cameras).
        pid_check: optional validation of a pid.

    Raises:
        DatasetLayoutError: on a missing/empty folder or a file name off the naming scheme.
    """
    records = []
    for path in list_images(directory, expected=expected):
        m = pattern.match(path.name)
        if m is None:
            raise DatasetLayoutError(
                f"file name does not follow the naming scheme /{pattern.pattern}/",
                path=path,
                expected=expected,
            )
        pid, cam = int(m.group(1)), int(m.group(2))
        if pid < JUNK_PID:
            raise DatasetLayoutError(f"invalid person id {pid}", path=path, expected=expected)
        if pid_check is not None:
            pid_check(pid, path)
        if pid == JUNK_PID or (pid == DISTRACTOR_PID and split != "gallery"):
            continue
        records.append(ReidRecord(str(path), pid, cam_map(cam, path)))
    return records
