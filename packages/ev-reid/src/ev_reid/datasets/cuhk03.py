"""CUHK03 (Li et al., CVPR 2014): new 767/700 protocol and the classic 20 splits.

The release ships ``cuhk-03.mat``, a MATLAB v7.3 (HDF5) file whose ``labeled`` and ``detected``
entries are 1×5 cell arrays (one per camera pair) of ``10 × num_pids`` cells of images (views
1-5 from the first camera of the pair, 6-10 from the second; empty cells where an identity has
fewer images). Images are extracted once to ``images_{labeled,detected}/`` as
``{campid}_{pid:03d}_{view}_{img:02d}.png`` (all 1-based). The new protocol (Zhong et al.,
CVPR 2017) is defined by ``cuhk03_new_protocol_config_{labeled,detected}.mat`` (MATLAB v5):
``filelist``, ``labels`` and 1-based ``train_idx`` / ``query_idx`` / ``gallery_idx``; the
camera id is the view field of the file name.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image

from ev_core.progress import progress
from ev_reid.datasets.base import DatasetLayoutError, ReidDataset, find_dataset_dir, relabel
from ev_reid.records import ReidRecord

__all__ = ["CUHK03", "extract_cuhk03_images"]

_NAME = re.compile(r"([1-5])_([0-9]{3})_([12])_([0-9]{2})\.png")
_RAW_MAT = ("cuhk03_release/cuhk-03.mat", "cuhk-03.mat")
NUM_CLASSIC_SPLITS = 20

LAYOUT = """\
<root>/  (or <root>/cuhk03/)
  cuhk03_release/cuhk-03.mat                (or cuhk-03.mat; only needed to extract images
                                             and for the classic protocol)
  images_labeled/ images_detected/          extracted {campid}_{pid:03d}_{view}_{img:02d}.png
  cuhk03_new_protocol_config_labeled.mat    new protocol (767 train / 700 test ids)
  cuhk03_new_protocol_config_detected.mat"""


def _require_h5py() -> Any:
    try:
        import h5py
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("reading cuhk-03.mat needs h5py: pip install 'ev-reid[cuhk03]'") from exc
    return h5py


def _raw_mat(dataset_dir: Path) -> Path | None:
    for rel in _RAW_MAT:
        if (dataset_dir / rel).is_file():
            return dataset_dir / rel
    return None


def extract_cuhk03_images(
    mat_path: str | os.PathLike[str], out_dir: str | os.PathLike[str], kind: str
) -> Path:
    """Extract the ``kind`` (``"labeled"`` or ``"detected"``) images of ``cuhk-03.mat``.

    Writes ``{campid}_{pid:03d}_{view}_{img:02d}.png`` (1-based; view 1 for cells 1-5, 2 for
    6-10; empty cells skipped) into a temporary folder renamed to ``out_dir`` at the end, so an
    interrupted extraction never leaves a partial ``out_dir``.

    Returns:
        ``out_dir``.

    Raises:
        DatasetLayoutError: if the file is not the HDF5 ``cuhk-03.mat`` structure.
    """
    h5py = _require_h5py()
    mat_path, out_dir = Path(mat_path), Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        with h5py.File(mat_path, "r") as f:
            if kind not in f:
                raise DatasetLayoutError(
                    f"no {kind!r} cell array in cuhk-03.mat", path=mat_path, expected=LAYOUT
                )
            pairs = np.asarray(f[kind]).reshape(-1)
            cells = [np.asarray(f[ref]).T for ref in pairs]  # [num_pids, 10] object refs
            total = sum(c.size for c in cells)
            with progress(total=total, desc=f"extracting CUHK03 {kind}") as bar:
                for campid, cell in enumerate(cells, start=1):
                    for pid in range(cell.shape[0]):
                        for img_idx, ref in enumerate(cell[pid]):
                            bar.update()
                            arr = np.asarray(f[ref])
                            if arr.ndim != 3 or arr.size == 0:  # empty MATLAB cell
                                continue
                            view = 1 if img_idx < 5 else 2
                            name = f"{campid}_{pid + 1:03d}_{view}_{img_idx + 1:02d}.png"
                            Image.fromarray(np.ascontiguousarray(arr.T).astype(np.uint8)).save(
                                tmp / name
                            )
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DatasetLayoutError(
            f"cannot read cuhk-03.mat as HDF5 ({exc})", path=mat_path, expected=LAYOUT
        ) from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    os.replace(tmp, out_dir)
    return out_dir


def _load_config(path: Path) -> dict[str, np.ndarray]:
    from scipy.io import loadmat

    try:
        mat = loadmat(str(path))
    except Exception as exc:
        raise DatasetLayoutError(
            f"cannot read the new-protocol config ({type(exc).__name__}: {exc})",
            path=path,
            expected=LAYOUT,
        ) from exc
    keys = ("filelist", "labels", "train_idx", "query_idx", "gallery_idx")
    missing = [k for k in keys if k not in mat]
    if missing:
        raise DatasetLayoutError(f"new-protocol config lacks {missing}", path=path, expected=LAYOUT)
    out: dict[str, np.ndarray] = {"filelist": _file_names(mat["filelist"], path)}
    for key in keys[1:]:
        out[key] = _integers(mat[key], key, path)
    return out


def _file_names(value: Any, path: Path) -> np.ndarray:
    """``filelist`` as a 1-D array of str (MATLAB cells of char arrays)."""
    names: list[str] = []
    for cell in np.asarray(value, dtype=object).reshape(-1):
        item = np.asarray(cell).reshape(-1)
        if item.size != 1 or not isinstance(item[0], str):
            raise DatasetLayoutError(
                f"filelist entry {len(names) + 1} is not a file name: {cell!r:.60}",
                path=path,
                expected=LAYOUT,
            )
        names.append(str(item[0]))
    return np.asarray(names, dtype=object)


def _integers(value: Any, key: str, path: Path) -> np.ndarray:
    """A numeric MATLAB vector as int64, rejecting text, non-finite and fractional entries."""
    arr = np.asarray(value)
    if arr.dtype.kind not in "iuf" or arr.ndim > 2 or (arr.ndim == 2 and 1 not in arr.shape):
        raise DatasetLayoutError(
            f"{key} must be a numeric vector, got {arr.dtype} of shape {arr.shape}",
            path=path,
            expected=LAYOUT,
        )
    arr = arr.reshape(-1)
    if arr.dtype.kind == "f" and not (np.isfinite(arr).all() and (arr == np.round(arr)).all()):
        raise DatasetLayoutError(f"{key} holds non-integer values", path=path, expected=LAYOUT)
    return arr.astype(np.int64)


def _parse_name(name: str, where: Path) -> tuple[int, int, int]:
    """``(campid, pid, view)`` of an extracted image name (1-based)."""
    m = _NAME.fullmatch(name)
    if m is None:
        raise DatasetLayoutError(
            f"image name {name!r} is not {{campid}}_{{pid:03d}}_{{view}}_{{img:02d}}.png",
            path=where,
            expected=LAYOUT,
        )
    return int(m.group(1)), int(m.group(2)), int(m.group(3))


class CUHK03(ReidDataset):
    """CUHK03 under the new (767/700) or the classic (20 splits of 100 test ids) protocol.

    New protocol sizes (train / query / gallery images): labeled 7,368 / 1,400 / 5,328,
    detected 7,365 / 1,400 / 5,332. Camera ids are the view (0 or 1) within a camera pair, as
    in torchreid. Query and gallery keep the protocol's person labels; train pids are
    relabelled in sorted order.

    Under the classic protocol the test identities of split ``split_id`` (from ``testsets``
    in ``cuhk-03.mat``, ``(campid, pid)`` pairs) form both query and gallery, and the other
    identities the training set; the raw pid of ``(campid, pid)`` is ``campid * 1000 + pid``.

    Images are read from ``images_{labeled,detected}/`` when present, and otherwise extracted
    there once from ``cuhk-03.mat`` (needs ``pip install 'ev-reid[cuhk03]'``).

    Args:
        root: the CUHK03 folder or a folder holding ``cuhk03/``.
        split_id: classic split in ``[0, 20)`` (ignored by the new protocol, which has one).
        labeled: labeled (hand-drawn) boxes if true, else detected (DPM) boxes.
        protocol: ``"new"`` or ``"classic"``.
        combineall: also train on query + gallery identities.
        verbose: print the summary table.

    Raises:
        DatasetLayoutError: missing files, a malformed ``.mat``, or image names off the scheme.
    """

    name = "cuhk03"
    layout = LAYOUT

    def __init__(
        self,
        root: str | os.PathLike[str],
        split_id: int = 0,
        labeled: bool = True,
        protocol: Literal["new", "classic"] = "new",
        *,
        combineall: bool = False,
        verbose: bool = False,
    ) -> None:
        if protocol not in ("new", "classic"):
            raise ValueError(f"protocol must be 'new' or 'classic', got {protocol!r}")
        self.kind = "labeled" if labeled else "detected"
        self.protocol = protocol
        self.split_id = split_id
        config_name = f"cuhk03_new_protocol_config_{self.kind}.mat"

        def valid(p: Path) -> bool:
            if protocol == "classic":
                return _raw_mat(p) is not None
            return (p / config_name).is_file()

        dataset_dir = find_dataset_dir(
            root, ("", "cuhk03", "CUHK03"), valid, name=self.name, expected=LAYOUT
        )
        self.images_dir = dataset_dir / f"images_{self.kind}"
        if not self.images_dir.is_dir():
            mat = _raw_mat(dataset_dir)
            if mat is None:
                raise DatasetLayoutError(
                    f"neither extracted images nor cuhk-03.mat to extract them from under "
                    f"{dataset_dir}; missing folder",
                    path=self.images_dir,
                    expected=LAYOUT,
                )
            extract_cuhk03_images(mat, self.images_dir, self.kind)
        if protocol == "new":
            train, query, gallery = self._new_protocol(dataset_dir / config_name)
        else:
            train, query, gallery = self._classic_protocol(dataset_dir)
        super().__init__(
            train, query, gallery, dataset_dir=dataset_dir, combineall=combineall, verbose=verbose
        )

    @property
    def use_metric_cuhk03(self) -> bool:
        """The classic splits are scored with single-gallery-shot CMC; the new protocol is not."""
        return self.protocol == "classic"

    def _record(self, name: str, pid: int, where: Path) -> ReidRecord:
        path = self.images_dir / name
        _, _, view = _parse_name(name, where)
        if not path.is_file():
            raise DatasetLayoutError(
                f"image listed in {where.name} is missing (delete {self.images_dir.name}/ "
                "to re-extract it from cuhk-03.mat)",
                path=path,
                expected=LAYOUT,
            )
        return ReidRecord(str(path), pid, view - 1)

    def _new_protocol(
        self, config: Path
    ) -> tuple[list[ReidRecord], list[ReidRecord], list[ReidRecord]]:
        cfg = _load_config(config)
        names = [str(x) for x in cfg["filelist"]]
        labels = cfg["labels"]
        if len(labels) != len(names):
            raise DatasetLayoutError(
                f"{len(names)} files but {len(labels)} labels", path=config, expected=LAYOUT
            )
        if labels.size and labels.min() < 0:
            raise DatasetLayoutError(
                f"negative person label {labels.min()}", path=config, expected=LAYOUT
            )
        splits = []
        for key in ("train_idx", "query_idx", "gallery_idx"):
            idx = cfg[key] - 1  # MATLAB indices are 1-based
            if idx.size and (idx.min() < 0 or idx.max() >= len(names)):
                raise DatasetLayoutError(
                    f"{key} outside 1..{len(names)}", path=config, expected=LAYOUT
                )
            splits.append([self._record(names[i], int(labels[i]), config) for i in idx])
        return relabel(splits[0]), splits[1], splits[2]

    def _classic_protocol(
        self, dataset_dir: Path
    ) -> tuple[list[ReidRecord], list[ReidRecord], list[ReidRecord]]:
        if not 0 <= self.split_id < NUM_CLASSIC_SPLITS:
            raise ValueError(f"split_id must be in [0, {NUM_CLASSIC_SPLITS}), got {self.split_id}")
        mat = _raw_mat(dataset_dir)
        assert mat is not None  # checked by find_dataset_dir
        h5py = _require_h5py()
        try:
            with h5py.File(mat, "r") as f:
                refs = np.asarray(f["testsets"]).reshape(-1)
                if len(refs) <= self.split_id:
                    raise DatasetLayoutError(
                        f"testsets has {len(refs)} splits", path=mat, expected=LAYOUT
                    )
                pairs = np.asarray(f[refs[self.split_id]]).T  # [100, 2] (campid, pid)
        except DatasetLayoutError:
            raise
        except Exception as exc:
            raise DatasetLayoutError(
                f"cannot read testsets from cuhk-03.mat ({type(exc).__name__}: {exc})",
                path=mat,
                expected=LAYOUT,
            ) from exc
        if pairs.ndim != 2 or pairs.shape[1] != 2 or pairs.dtype.kind not in "iuf":
            raise DatasetLayoutError(
                f"testsets split {self.split_id} is not a [N, 2] numeric (campid, pid) array "
                f"({pairs.dtype}, shape {pairs.shape})",
                path=mat,
                expected=LAYOUT,
            )
        test_ids = {(int(c), int(p)) for c, p in np.nan_to_num(pairs).astype(np.int64)}
        train: list[ReidRecord] = []
        test: list[ReidRecord] = []
        for path in sorted(self.images_dir.glob("*.png")):
            campid, pid, view = _parse_name(path.name, path)
            key = campid * 1000 + pid  # raw test pid; sorts like (campid, pid)
            rec = ReidRecord(str(path), key, view - 1)
            (test if (campid, pid) in test_ids else train).append(rec)
        if not test:
            raise DatasetLayoutError(
                f"no image of classic split {self.split_id}'s test ids in",
                path=self.images_dir,
                expected=LAYOUT,
            )
        return relabel(train), test, list(test)
