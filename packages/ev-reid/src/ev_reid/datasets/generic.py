"""Generic re-id datasets: list files (``path pid camid``) and folders of identities."""

from __future__ import annotations

import os
from pathlib import Path

from ev_reid.datasets.base import (
    IMAGE_EXTENSIONS,
    JUNK_PID,
    DatasetLayoutError,
    ReidDataset,
    list_images,
    parse_int,
    read_text_lines,
    relabel,
)
from ev_reid.records import ReidRecord

__all__ = ["ImageFolderDataset", "ImageListDataset"]

_SPLITS = ("train", "query", "gallery")


def _check_pairs(query: object, gallery: object, where: Path, layout: str) -> None:
    if (query is None) != (gallery is None):
        raise DatasetLayoutError(
            "query and gallery must be given together", path=where, expected=layout
        )


class ImageListDataset(ReidDataset):
    """A dataset described by list files with one ``<path> <pid> <camid>`` line per image.

    Paths are relative to ``root`` (or absolute) and may contain spaces; ``camid`` is 0-based;
    pid ``-1`` marks junk and is dropped; blank lines and ``#`` comments are ignored. Training
    pids are relabelled in sorted order; query and gallery pids are kept.

    Args:
        root: folder the image paths are relative to.
        train: training list (``None``: no training split).
        query: query list (``None`` together with ``gallery``: no test split).
        gallery: gallery list.
        combineall: also train on query + gallery identities.
        verbose: print the summary table.

    Raises:
        DatasetLayoutError: a missing list or a malformed line (file and line number).
    """

    name = "image_list"
    layout = """\
<root>/
  train.txt query.txt gallery.txt   lines '<path> <pid> <camid>' (path relative to <root>,
                                    camid 0-based, pid -1 = junk)"""

    def __init__(
        self,
        root: str | os.PathLike[str],
        train: str | os.PathLike[str] | None = "train.txt",
        query: str | os.PathLike[str] | None = "query.txt",
        gallery: str | os.PathLike[str] | None = "gallery.txt",
        *,
        combineall: bool = False,
        verbose: bool = False,
    ) -> None:
        root = Path(root).expanduser()
        if not root.is_dir():
            raise DatasetLayoutError("dataset root does not exist", path=root, expected=self.layout)
        _check_pairs(query, gallery, root, self.layout)
        if train is None and query is None:
            raise ValueError("give at least a train list or query + gallery lists")
        splits = {
            name: [] if lst is None else self._read(root, root / lst)
            for name, lst in zip(_SPLITS, (train, query, gallery), strict=True)
        }
        super().__init__(
            relabel(splits["train"]),
            splits["query"],
            splits["gallery"],
            dataset_dir=root,
            combineall=combineall,
            verbose=verbose,
        )

    def _read(self, root: Path, list_path: Path) -> list[ReidRecord]:
        records = []
        for lineno, raw in enumerate(read_text_lines(list_path, expected=self.layout), 1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            fields = line.rsplit(maxsplit=2)
            numbers = [parse_int(f) for f in fields[1:]]
            if len(fields) != 3 or None in numbers:
                raise DatasetLayoutError(
                    f"line {lineno} is not '<path> <pid> <camid>': {raw!r}",
                    path=list_path,
                    expected=self.layout,
                )
            path, (pid, camid) = fields[0], numbers
            assert pid is not None and camid is not None
            if pid < JUNK_PID or camid < 0:
                raise DatasetLayoutError(
                    f"line {lineno}: pid must be >= -1 and camid >= 0: {raw!r}",
                    path=list_path,
                    expected=self.layout,
                )
            if pid != JUNK_PID:
                records.append(ReidRecord(str(root / path), pid, camid))
        if not records:
            raise DatasetLayoutError("list file has no image", path=list_path, expected=self.layout)
        return records


def _numeric(names: set[str]) -> bool:
    """Whether the names are distinct non-negative ASCII integers (then ids are the numbers)."""
    values = [parse_int(n) for n in names]
    return all(v is not None and v >= 0 for v in values) and len(set(values)) == len(values)


def _sorted_names(names: set[str]) -> list[str]:
    """Numeric names (:func:`_numeric`) in numeric order, otherwise lexicographic."""
    if _numeric(names):
        return sorted(names, key=lambda n: (int(n), n))
    return sorted(names)


class ImageFolderDataset(ReidDataset):
    """A folder-of-identities dataset.

    Each split folder holds one sub-folder per identity. An identity folder holds either
    images directly (all from camera 0) or one sub-folder per camera holding images. Pids are
    the identity-folder names when all are distinct non-negative integers, otherwise the index of the name in the
    sorted list of identity names over query + gallery (so both splits agree); camera ids are
    the index of the camera-folder name among all camera names, sorted (numerically when all
    are integers). Training pids are relabelled in sorted order. The cross-camera evaluation
    protocol needs camera folders in query/gallery. An identity folder named ``-1`` holds junk
    and is skipped.

    Args:
        root: the dataset folder.
        train: training split folder name (``None``: no training split).
        query: query split folder name (``None`` with ``gallery``: no test split).
        gallery: gallery split folder name.
        combineall: also train on query + gallery identities.
        verbose: print the summary table.

    Raises:
        DatasetLayoutError: missing folders, an empty identity, or a stray file (with path).
    """

    name = "image_folder"
    layout = """\
<root>/
  train/<identity>/<image>            (or train/<identity>/<camera>/<image>)
  query/<identity>/<camera>/<image>
  gallery/<identity>/<camera>/<image>"""

    def __init__(
        self,
        root: str | os.PathLike[str],
        train: str | None = "train",
        query: str | None = "query",
        gallery: str | None = "gallery",
        *,
        combineall: bool = False,
        verbose: bool = False,
    ) -> None:
        root = Path(root).expanduser()
        if not root.is_dir():
            raise DatasetLayoutError("dataset root does not exist", path=root, expected=self.layout)
        _check_pairs(query, gallery, root, self.layout)
        if train is None and query is None:
            raise ValueError("give at least a train folder or query + gallery folders")
        raw = {
            name: [] if folder is None else self._scan(root / folder)
            for name, folder in zip(_SPLITS, (train, query, gallery), strict=True)
        }
        cams = _sorted_names({c for items in raw.values() for _, c, _ in items})
        cam_ids = {c: i for i, c in enumerate(cams)}
        test_ids = _sorted_names({i for s in ("query", "gallery") for i, _, _ in raw[s]})
        test_numeric = _numeric(set(test_ids))
        test_pid = {n: int(n) if test_numeric else k for k, n in enumerate(test_ids)}
        train_ids = {n: k for k, n in enumerate(_sorted_names({i for i, _, _ in raw["train"]}))}
        splits = {
            name: [
                ReidRecord(str(p), (train_ids if name == "train" else test_pid)[i], cam_ids[c])
                for i, c, p in items
            ]
            for name, items in raw.items()
        }
        super().__init__(
            splits["train"],
            splits["query"],
            splits["gallery"],
            dataset_dir=root,
            combineall=combineall,
            verbose=verbose,
        )

    def _scan(self, split_dir: Path) -> list[tuple[str, str, Path]]:
        """``(identity, camera, path)`` for every image of a split folder."""
        if not split_dir.is_dir():
            raise DatasetLayoutError("missing folder", path=split_dir, expected=self.layout)
        items: list[tuple[str, str, Path]] = []
        identities = sorted(
            p for p in split_dir.iterdir() if not p.name.startswith(".") and p.name != "-1"
        )
        if not identities:
            raise DatasetLayoutError(
                "folder holds no identity", path=split_dir, expected=self.layout
            )
        for ident in identities:
            if not ident.is_dir():
                raise DatasetLayoutError(
                    "expected only identity folders, found a file", path=ident, expected=self.layout
                )
            entries = sorted(p for p in ident.iterdir() if not p.name.startswith("."))
            subdirs = [p for p in entries if p.is_dir()]
            if subdirs:
                stray = [p for p in entries if p.suffix.lower() in IMAGE_EXTENSIONS]
                if stray:
                    raise DatasetLayoutError(
                        "identity folder mixes images and camera folders",
                        path=stray[0],
                        expected=self.layout,
                    )
                for cam_dir in subdirs:
                    items += [
                        (ident.name, cam_dir.name, p)
                        for p in list_images(cam_dir, expected=self.layout)
                    ]
            else:
                items += [(ident.name, "0", p) for p in list_images(ident, expected=self.layout)]
        return items
