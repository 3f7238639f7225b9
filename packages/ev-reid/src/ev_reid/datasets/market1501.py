"""Market-1501 (Zheng et al., ICCV 2015) and its Market-style relative PersonX."""

from __future__ import annotations

import os
import re
from pathlib import Path

from ev_reid.datasets.base import (
    DatasetLayoutError,
    ReidDataset,
    find_dataset_dir,
    parse_market_style,
    relabel,
)

__all__ = ["Market1501", "PersonX"]

_MARKET_PATTERN = re.compile(r"(-1|\d+)_c(\d+)s\d+_\d+_\d+")
_SPLIT_DIRS = {"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"}


class Market1501(ReidDataset):
    """Market-1501: 751 training ids (12,936 images), 3,368 queries, 15,913 gallery images.

    File names ``0002_c1s1_000451_03.jpg`` = pid 0002, camera 1 (of 6), sequence 1, frame
    000451, box 03. Junk (pid ``-1``) is dropped; distractors (pid ``0000``) stay in the
    gallery; cameras become 0-based; training pids are relabelled in sorted order.

    Args:
        root: the ``Market-1501-v15.09.15`` folder, or a folder holding it (directly or under
            ``market1501/``).
        combineall: also train on query + gallery identities (torchreid's ``combineall``).
        verbose: print the summary table.

    Raises:
        DatasetLayoutError: a missing folder or a file name off the naming scheme (with path).
    """

    name = "market1501"
    layout = """\
<root>/  (or <root>/market1501/, <root>/Market-1501-v15.09.15/)
  bounding_box_train/  0002_c1s1_000451_03.jpg ...  (<pid>_c<cam>s<seq>_<frame>_<box>.jpg)
  bounding_box_test/   gallery; pid -1 = junk (dropped), 0000 = distractor (kept)
  query/"""
    _has_distractors = True
    _num_cameras = 6
    _candidates: tuple[str, ...] = (
        "",
        "Market-1501-v15.09.15",
        "market1501",
        "market1501/Market-1501-v15.09.15",
        "Market-1501",
    )
    _pattern = _MARKET_PATTERN

    def __init__(
        self, root: str | os.PathLike[str], *, combineall: bool = False, verbose: bool = False
    ) -> None:
        dataset_dir = find_dataset_dir(
            root,
            self._candidates,
            lambda p: (p / _SPLIT_DIRS["train"]).is_dir(),
            name=self.name,
            expected=self.layout,
        )
        splits = {
            split: parse_market_style(
                dataset_dir / folder,
                split=split,
                expected=self.layout,
                pattern=self._pattern,
                cam_map=self._camera,
            )
            for split, folder in _SPLIT_DIRS.items()
        }
        super().__init__(
            relabel(splits["train"]),
            splits["query"],
            splits["gallery"],
            dataset_dir=dataset_dir,
            combineall=combineall,
            verbose=verbose,
        )

    def _camera(self, cam: int, path: Path) -> int:
        if not 1 <= cam <= self._num_cameras:
            raise DatasetLayoutError(
                f"camera c{cam} outside c1..c{self._num_cameras}", path=path, expected=self.layout
            )
        return cam - 1


class PersonX(Market1501):
    """PersonX (Sun & Zheng, CVPR 2019), subset1 in Market layout.

    1,266 ids; 9,840 train / 5,136 query / 30,816 gallery images. File names follow
    ``<pid>_c<cam>...`` with cameras {3, 4, 8, 10, 11, 12}, mapped to 0..5 in that order.

    Args:
        root: the subset folder, or a folder holding ``PersonX_v1/subset1``, ``personx`` or
            ``subset1``.
        combineall: also train on query + gallery identities.
        verbose: print the summary table.
    """

    name = "personx"
    layout = """\
<root>/  (or <root>/PersonX_v1/subset1/, <root>/personx/, <root>/subset1/)
  bounding_box_train/  <pid>_c<cam>...jpg, cameras in {3, 4, 8, 10, 11, 12}
  bounding_box_test/
  query/"""
    _candidates = ("", "PersonX_v1/subset1", "personx", "PersonX", "subset1", "personx/subset1")
    _pattern = re.compile(r"(-1|\d+)_c(\d+)")
    CAMERAS: tuple[int, ...] = (3, 4, 8, 10, 11, 12)

    def _camera(self, cam: int, path: Path) -> int:
        try:
            return self.CAMERAS.index(cam)
        except ValueError:
            raise DatasetLayoutError(
                f"camera c{cam} is not a PersonX camera {self.CAMERAS}",
                path=path,
                expected=self.layout,
            ) from None
