"""MSMT17 (Wei et al., CVPR 2018), V1 (``train/``, ``test/``) and V2 (``mask_*_v2/``)."""

from __future__ import annotations

import os
import re
from pathlib import Path

from ev_reid.datasets.base import (
    DatasetLayoutError,
    ReidDataset,
    find_dataset_dir,
    parse_int,
    read_text_lines,
    relabel,
)
from ev_reid.records import ReidRecord

__all__ = ["MSMT17"]

_NAME = re.compile(r"([0-9]+)_([0-9]+)_([0-9]{2})_")
_VERSIONS = {"train": "test", "mask_train_v2": "mask_test_v2"}
NUM_CAMERAS = 15

LAYOUT = """\
<root>/  (or <root>/msmt17/, <root>/[msmt17/]MSMT17_V1/, <root>/[msmt17/]MSMT17_V2/)
  train/ test/  (V1)  or  mask_train_v2/ mask_test_v2/  (V2)
  list_train.txt list_val.txt     '0000/0000_000_01_0303morning_0015_0.jpg 0'
  list_query.txt list_gallery.txt  (<pid>/<pid>_<index>_<camera 01-15>_... <pid label>)"""


def _read_list(list_path: Path, image_dir: Path) -> list[ReidRecord]:
    """Parse an MSMT17 list file; camera id = third ``_`` field of the name, made 0-based."""
    records = []
    for lineno, line in enumerate(read_text_lines(list_path, expected=LAYOUT), 1):
        if not line.strip():
            continue
        fields = line.split()
        m = _NAME.match(Path(fields[0]).name)
        label = parse_int(fields[1]) if len(fields) == 2 else None
        if label is None or m is None:
            raise DatasetLayoutError(
                f"line {lineno} is not '<pid>/<pid>_<idx>_<cam>_....jpg <pid>': {line!r}",
                path=list_path,
                expected=LAYOUT,
            )
        cam = int(m.group(3))
        if not 1 <= cam <= NUM_CAMERAS:
            raise DatasetLayoutError(
                f"line {lineno}: camera {cam} outside 01..{NUM_CAMERAS}",
                path=list_path,
                expected=LAYOUT,
            )
        pid = label
        if pid < 0:
            raise DatasetLayoutError(
                f"line {lineno}: negative pid {pid}", path=list_path, expected=LAYOUT
            )
        records.append(ReidRecord(str(image_dir / fields[0]), pid, cam - 1))
    if not records:
        raise DatasetLayoutError("empty list file", path=list_path, expected=LAYOUT)
    return records


class MSMT17(ReidDataset):
    """MSMT17: 4,101 ids over 15 cameras; 1,041 training ids, 11,659 queries, 82,161 gallery.

    Records come from the official list files; the pid is the list's label and the camera the
    third ``_`` field of the file name (01-15, made 0-based). Like torchreid, the validation
    list (2,373 images of training ids) is only added to training when asked
    (``include_val`` or ``combineall``): train + val = 32,621 images.

    Args:
        root: the ``MSMT17_V1``/``MSMT17_V2`` folder or a folder holding it.
        include_val: train on ``list_train`` + ``list_val``.
        combineall: train on train + val + query + gallery (implies ``include_val``).
        verbose: print the summary table.

    Raises:
        DatasetLayoutError: missing folders/lists or malformed list lines (file and line).
    """

    name = "msmt17"
    layout = LAYOUT

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        include_val: bool = False,
        combineall: bool = False,
        verbose: bool = False,
    ) -> None:
        candidates = (
            "",
            "MSMT17_V2",
            "MSMT17_V1",
            "msmt17",
            "msmt17/MSMT17_V2",
            "msmt17/MSMT17_V1",
        )
        dataset_dir = find_dataset_dir(
            root,
            candidates,
            lambda p: any((p / d).is_dir() for d in _VERSIONS),
            name=self.name,
            expected=LAYOUT,
        )
        train_name = next(d for d in _VERSIONS if (dataset_dir / d).is_dir())
        train_dir, test_dir = dataset_dir / train_name, dataset_dir / _VERSIONS[train_name]
        if not test_dir.is_dir():
            raise DatasetLayoutError("missing folder", path=test_dir, expected=LAYOUT)
        self.version = "V2" if train_name.endswith("v2") else "V1"
        train = _read_list(dataset_dir / "list_train.txt", train_dir)
        if include_val or combineall:
            train += _read_list(dataset_dir / "list_val.txt", train_dir)
        super().__init__(
            relabel(train),
            _read_list(dataset_dir / "list_query.txt", test_dir),
            _read_list(dataset_dir / "list_gallery.txt", test_dir),
            dataset_dir=dataset_dir,
            combineall=combineall,
            verbose=verbose,
        )
