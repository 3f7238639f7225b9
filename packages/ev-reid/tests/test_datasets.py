"""Dataset parsing on generated folders that follow the official layouts and naming schemes."""

from __future__ import annotations

import re
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image
from scipy.io import savemat

from ev_reid import datasets
from ev_reid.datasets import (
    CUHK03,
    MSMT17,
    DatasetLayoutError,
    ImageDataset,
    ImageFolderDataset,
    ImageListDataset,
    ImageReadError,
    Market1501,
    PersonX,
    combine_datasets,
)
from ev_reid.records import ReidRecord


def _img(path: Path, colour: tuple[int, int, int] = (10, 20, 30), size: tuple[int, int] = (8, 4)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size[1], size[0]), colour).save(path)


def _market(root: Path, train: list[str], query: list[str], gallery: list[str]) -> Path:
    for folder, names in (("bounding_box_train", train), ("query", query),
                          ("bounding_box_test", gallery)):  # fmt: skip
        (root / folder).mkdir(parents=True, exist_ok=True)
        for name in names:
            _img(root / folder / name)
    return root


MARKET_TRAIN = [
    "0010_c6s4_002452_02.jpg",
    "0002_c1s1_000451_03.jpg",
    "0002_c2s1_000301_01.jpg",
    "0007_c3s3_075694_01.jpg",
    "0007_c5s2_012345_04.jpg",
    "-1_c1s1_000401_03.jpg",  # junk: dropped
]
MARKET_QUERY = ["0001_c1s1_001051_00.jpg", "0003_c4s6_000010_01.jpg"]
MARKET_GALLERY = [
    "0001_c2s1_000001_01.jpg",
    "0003_c1s1_000002_02.jpg",
    "0000_c3s1_000003_03.jpg",  # distractor: kept
    "0000_c6s2_000004_01.jpg",
    "-1_c1s1_000005_01.jpg",  # junk: dropped
    "-1_c2s1_000006_01.jpg",
]


@pytest.fixture
def market_root(tmp_path: Path) -> Path:
    root = _market(tmp_path / "Market-1501-v15.09.15", MARKET_TRAIN, MARKET_QUERY, MARKET_GALLERY)
    (root / "bounding_box_test" / "Thumbs.db").write_bytes(b"not an image")  # ignored
    return root


def _by_name(records: list[ReidRecord]) -> dict[str, tuple[int, int]]:
    return {Path(r.path).name: (r.pid, r.camid) for r in records}


def test_market1501_parsing(market_root: Path) -> None:
    ds = Market1501(market_root)
    assert ds.dataset_dir == market_root
    # sorted relabelling 2 -> 0, 7 -> 1, 10 -> 2; cameras 0-based; junk dropped
    assert _by_name(ds.train) == {
        "0002_c1s1_000451_03.jpg": (0, 0),
        "0002_c2s1_000301_01.jpg": (0, 1),
        "0007_c3s3_075694_01.jpg": (1, 2),
        "0007_c5s2_012345_04.jpg": (1, 4),
        "0010_c6s4_002452_02.jpg": (2, 5),
    }
    assert _by_name(ds.query) == {
        "0001_c1s1_001051_00.jpg": (1, 0),
        "0003_c4s6_000010_01.jpg": (3, 3),
    }
    assert _by_name(ds.gallery) == {
        "0001_c2s1_000001_01.jpg": (1, 1),
        "0003_c1s1_000002_02.jpg": (3, 0),
        "0000_c3s1_000003_03.jpg": (0, 2),
        "0000_c6s2_000004_01.jpg": (0, 5),
    }
    assert (ds.num_train_pids, ds.num_train_cams) == (3, 5)
    assert ds.num_query_pids == 2 and ds.num_gallery_pids == 3
    assert all(Path(r.path).is_file() for r in ds.train + ds.query + ds.gallery)
    table = repr(ds)
    assert "train    |     3 |        5 |         5" in table
    assert "gallery  |     3 |        4 |         4" in table
    ds.verify_files()


def test_market1501_deterministic_order(market_root: Path) -> None:
    assert Market1501(market_root).train == Market1501(market_root).train


@pytest.mark.parametrize("sub", ["market1501/Market-1501-v15.09.15", "market1501", ""])
def test_market1501_root_variants(tmp_path: Path, sub: str) -> None:
    _market(tmp_path / sub, MARKET_TRAIN[:2], MARKET_QUERY, MARKET_GALLERY)
    assert Market1501(tmp_path).num_train_pids == 2


def test_market1501_combineall(market_root: Path) -> None:
    ds = Market1501(market_root, combineall=True)
    # query + gallery ids {1, 3} (distractor 0 excluded) relabelled after the 3 train ids
    extra = _by_name(ds.train[5:])
    assert extra == {
        "0001_c1s1_001051_00.jpg": (3, 0),
        "0003_c4s6_000010_01.jpg": (4, 3),
        "0001_c2s1_000001_01.jpg": (3, 1),
        "0003_c1s1_000002_02.jpg": (4, 0),
    }
    assert ds.num_train_pids == 5


def test_market1501_errors(tmp_path: Path, market_root: Path) -> None:
    with pytest.raises(DatasetLayoutError, match="does not exist") as err:
        Market1501(tmp_path / "nowhere")
    assert "bounding_box_train/" in str(err.value)  # the expected layout is printed
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetLayoutError, match="no folder with the expected layout"):
        Market1501(empty)
    # a missing split folder is named
    (market_root / "query").rename(market_root / "query_moved")
    with pytest.raises(DatasetLayoutError, match="missing folder") as err:
        Market1501(market_root)
    assert str(market_root / "query") in str(err.value)
    (market_root / "query_moved").rename(market_root / "query")
    # a file name off the naming scheme is reported, never skipped
    bad = market_root / "bounding_box_train" / "person_12.jpg"
    _img(bad)
    with pytest.raises(DatasetLayoutError, match="naming scheme") as err:
        Market1501(market_root)
    assert str(bad) in str(err.value)
    bad.unlink()
    cam7 = market_root / "query" / "0005_c7s1_000001_01.jpg"
    _img(cam7)
    with pytest.raises(DatasetLayoutError, match=re.escape("c7 outside c1..c6")) as err:
        Market1501(market_root)
    assert str(cam7) in str(err.value)
    cam7.unlink()
    for f in (market_root / "query").iterdir():
        f.unlink()
    with pytest.raises(DatasetLayoutError, match="holds no image"):
        Market1501(market_root)


def test_verify_files_names_missing_image(market_root: Path) -> None:
    ds = Market1501(market_root)
    Path(ds.gallery[0].path).unlink()
    with pytest.raises(DatasetLayoutError, match="1 image file") as err:
        ds.verify_files()
    assert ds.gallery[0].path in str(err.value)


def test_personx_camera_mapping(tmp_path: Path) -> None:
    root = tmp_path / "PersonX_v1" / "subset1"
    train = [f"0001_c{c}s1_{i:06d}_01.jpg" for i, c in enumerate((3, 4, 8, 10, 11, 12))]
    _market(root, [*train, "0005_c3s1_000100_01.jpg"], ["0101_c8s1_000001_01.jpg"],
            ["0101_c12s1_000002_01.jpg", "0102_c4s1_000003_01.jpg"])  # fmt: skip
    ds = PersonX(tmp_path)
    assert sorted((r.pid, r.camid) for r in ds.train) == [(0, k) for k in range(6)] + [(1, 0)]
    assert _by_name(ds.query) == {"0101_c8s1_000001_01.jpg": (101, 2)}
    assert sorted((r.pid, r.camid) for r in ds.gallery) == [(101, 5), (102, 1)]
    bad = root / "query" / "0101_c5s1_000009_01.jpg"
    _img(bad)
    with pytest.raises(DatasetLayoutError, match="not a PersonX camera") as err:
        PersonX(root)
    assert str(bad) in str(err.value)


# --------------------------------------------------------------------------- MSMT17


def _msmt(root: Path, train_dir: str, test_dir: str) -> Path:
    lists = {
        "list_train.txt": ["0003/0003_000_01_0303morning_0015_0.jpg 3",
                           "0001/0001_004_15_0303noon_0112_1.jpg 1",
                           "0001/0001_005_07_0303noon_0113_0.jpg 1"],
        "list_val.txt": ["0002/0002_001_02_0303morning_0016_0.jpg 2",
                         "0001/0001_009_03_0303morning_0017_0.jpg 1"],
        "list_query.txt": ["0000/0000_000_04_0303afternoon_0001_0.jpg 0"],
        "list_gallery.txt": ["0000/0000_001_05_0303afternoon_0002_0.jpg 0",
                             "0009/0009_000_10_0303afternoon_0003_0.jpg 9"],
    }  # fmt: skip
    for name, lines in lists.items():
        folder = train_dir if name in ("list_train.txt", "list_val.txt") else test_dir
        for line in lines:
            _img(root / folder / line.split()[0])
        (root / name).write_text("\n".join(lines) + "\n")
    return root


@pytest.mark.parametrize(
    ("sub", "train_dir", "test_dir", "version"),
    [
        ("msmt17/MSMT17_V1", "train", "test", "V1"),
        ("MSMT17_V2", "mask_train_v2", "mask_test_v2", "V2"),
    ],
)
def test_msmt17_lists(
    tmp_path: Path, sub: str, train_dir: str, test_dir: str, version: str
) -> None:
    root = _msmt(tmp_path / sub, train_dir, test_dir)
    ds = MSMT17(tmp_path)
    assert ds.version == version and ds.dataset_dir == root
    assert [(Path(r.path).relative_to(root).as_posix(), r.pid, r.camid) for r in ds.train] == [
        (f"{train_dir}/0003/0003_000_01_0303morning_0015_0.jpg", 1, 0),
        (f"{train_dir}/0001/0001_004_15_0303noon_0112_1.jpg", 0, 14),
        (f"{train_dir}/0001/0001_005_07_0303noon_0113_0.jpg", 0, 6),
    ]
    assert [(r.pid, r.camid) for r in ds.query] == [(0, 3)]
    assert [(r.pid, r.camid) for r in ds.gallery] == [(0, 4), (9, 9)]
    assert all(Path(r.path).is_file() for r in ds.query + ds.gallery)
    with_val = MSMT17(root, include_val=True)
    # val shares the training label space: ids {1, 2, 3} -> {0, 1, 2}
    assert [(r.pid, r.camid) for r in with_val.train] == [(2, 0), (0, 14), (0, 6), (1, 1), (0, 2)]
    combined = MSMT17(root, combineall=True)
    assert len(combined.train) == 5 + 3 and combined.num_train_pids == 3 + 2


def test_msmt17_errors(tmp_path: Path) -> None:
    root = _msmt(tmp_path / "MSMT17_V1", "train", "test")
    (root / "list_query.txt").write_text("0000/0000_000_04_0303afternoon_0001_0.jpg\n")
    with pytest.raises(DatasetLayoutError, match="line 1") as err:
        MSMT17(root)
    assert str(root / "list_query.txt") in str(err.value)
    (root / "list_query.txt").write_text("0000/0000_000_16_0303afternoon_0001_0.jpg 0\n")
    with pytest.raises(DatasetLayoutError, match="camera 16"):
        MSMT17(root)
    (root / "list_query.txt").unlink()
    with pytest.raises(DatasetLayoutError, match="missing list file") as err:
        MSMT17(root)
    assert "list_query.txt" in str(err.value)


# --------------------------------------------------------------------------- CUHK03


def _cuhk_image(campid: int, pid: int, idx: int, kind: int) -> np.ndarray:
    """A distinctive [H, W, 3] uint8 image (non-square, so a transposition would show)."""
    h, w = 6 + campid, 3 + pid
    img = np.zeros((h, w, 3), np.uint8)
    img[..., 0] = 10 * campid + kind
    img[..., 1] = 10 * pid + idx
    img[..., 2] = np.arange(w)[None, :] * 7 + np.arange(h)[:, None]  # orientation check
    return img


# images per (camera pair, pid): cells 0-4 view 1, 5-9 view 2; missing cells stay empty
CUHK_CELLS = {
    (1, 1): [0, 1, 5, 6],
    (1, 2): [0, 5, 6, 7],
    (2, 1): [0, 1, 2, 5],
    (5, 1): [3, 8],
    (5, 2): [0, 9],
}


def _write_cuhk03_mat(path: Path) -> None:
    """A tiny cuhk-03.mat with the release's MATLAB v7.3 structure.

    ``labeled``/``detected``: 1×5 object references to the camera-pair cells; each cell is
    stored transposed as [10, num_pids] references to images stored as [3, W, H] uint8 (MATLAB
    column-major); empty cells are MATLAB empties (uint64 [0, 0] with MATLAB_empty); ``testsets``
    is 1×20 references to [2, 100]-style (campid, pid) tables (here 2 ids per split).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        refs = f.create_group("#refs#")
        counter = iter(range(10**6))

        def store(data: np.ndarray, empty: bool = False) -> h5py.Reference:
            ds = refs.create_dataset(f"r{next(counter)}", data=data)
            if empty:
                ds.attrs["MATLAB_empty"] = np.uint8(1)
            return ds.ref

        for kind_i, kind in enumerate(("labeled", "detected")):
            top = f.create_dataset(kind, shape=(1, 5), dtype=h5py.ref_dtype)
            for campid in range(1, 6):
                num_pids = (
                    max(p for c, p in CUHK_CELLS if c == campid) if campid in (1, 2, 5) else 1
                )
                cell = np.empty((10, num_pids), dtype=object)
                for pid in range(1, num_pids + 1):
                    for idx in range(10):
                        if idx in CUHK_CELLS.get((campid, pid), []):
                            img = _cuhk_image(campid, pid, idx, kind_i)
                            cell[idx, pid - 1] = store(np.ascontiguousarray(img.T))
                        else:
                            cell[idx, pid - 1] = store(np.zeros(2, np.uint64), empty=True)
                cell_ds = refs.create_dataset(
                    f"cell{kind}{campid}", data=cell, dtype=h5py.ref_dtype
                )
                top[0, campid - 1] = cell_ds.ref
        tests = f.create_dataset("testsets", shape=(1, 20), dtype=h5py.ref_dtype)
        for split in range(20):
            pairs = [(1, 1), (5, 2)] if split == 0 else [(2, 1), (1, 2)]
            tests[0, split] = store(np.asarray(pairs, dtype=np.float64).T)


def _names(cells: dict[tuple[int, int], list[int]]) -> list[str]:
    return sorted(
        f"{c}_{p:03d}_{1 if i < 5 else 2}_{i + 1:02d}.png"
        for (c, p), idx in cells.items()
        for i in idx
    )


def _write_config(path: Path, names: list[str], lab: list[int],
                  train: list[int], query: list[int], gallery: list[int]) -> None:  # fmt: skip
    filelist = np.empty((len(names), 1), dtype=object)
    for i, n in enumerate(names):
        filelist[i, 0] = n
    savemat(
        path,
        {
            "filelist": filelist,
            "labels": np.asarray(lab, np.float64)[:, None],
            "camId": np.asarray([int(n.split("_")[2]) for n in names], np.float64)[:, None],
            "train_idx": np.asarray(train, np.float64)[:, None],  # 1-based, as the release
            "query_idx": np.asarray(query, np.float64)[:, None],
            "gallery_idx": np.asarray(gallery, np.float64)[:, None],
        },
    )


@pytest.fixture
def cuhk_root(tmp_path: Path) -> Path:
    root = tmp_path / "cuhk03"
    _write_cuhk03_mat(root / "cuhk03_release" / "cuhk-03.mat")
    names = _names(CUHK_CELLS)
    person = {(1, 1): 1, (1, 2): 2, (2, 1): 3, (5, 1): 4, (5, 2): 5}  # protocol labels
    labels = [person[(int(n[0]), int(n[2:5]))] for n in names]
    idx = {n: i + 1 for i, n in enumerate(names)}  # 1-based positions in filelist
    train = [idx[n] for n in names if n[:5] in ("1_001", "1_002")]
    query = [idx["2_001_1_01.png"], idx["5_002_2_10.png"]]
    gallery = [idx[n] for n in ("2_001_2_06.png", "5_002_1_01.png", "5_001_1_04.png")]
    for kind in ("labeled", "detected"):
        _write_config(root / f"cuhk03_new_protocol_config_{kind}.mat", names, labels,
                      train, query, gallery)  # fmt: skip
    return tmp_path


def test_cuhk03_extracts_images_from_mat(cuhk_root: Path) -> None:
    ds = CUHK03(cuhk_root, labeled=True)
    images = ds.dataset_dir / "images_labeled"
    assert sorted(p.name for p in images.iterdir()) == _names(CUHK_CELLS)  # empty cells skipped
    for (campid, pid), cells in CUHK_CELLS.items():
        for i in cells:
            name = f"{campid}_{pid:03d}_{1 if i < 5 else 2}_{i + 1:02d}.png"
            got = np.asarray(Image.open(images / name))
            np.testing.assert_array_equal(got, _cuhk_image(campid, pid, i, 0))
    detected = CUHK03(cuhk_root, labeled=False)
    got = np.asarray(Image.open(detected.dataset_dir / "images_detected" / "1_001_1_01.png"))
    np.testing.assert_array_equal(got, _cuhk_image(1, 1, 0, 1))


def test_cuhk03_new_protocol(cuhk_root: Path) -> None:
    ds = CUHK03(cuhk_root, split_id=0, labeled=True, protocol="new")
    # train: labels 1 and 2 -> 0 and 1; camid = view - 1 (the third '_' field)
    assert sorted(_by_name(ds.train).items()) == [
        ("1_001_1_01.png", (0, 0)), ("1_001_1_02.png", (0, 0)), ("1_001_2_06.png", (0, 1)),
        ("1_001_2_07.png", (0, 1)), ("1_002_1_01.png", (1, 0)), ("1_002_2_06.png", (1, 1)),
        ("1_002_2_07.png", (1, 1)), ("1_002_2_08.png", (1, 1)),
    ]  # fmt: skip
    assert [(Path(r.path).name, r.pid, r.camid) for r in ds.query] == [
        ("2_001_1_01.png", 3, 0),
        ("5_002_2_10.png", 5, 1),
    ]
    assert [(Path(r.path).name, r.pid, r.camid) for r in ds.gallery] == [
        ("2_001_2_06.png", 3, 1),
        ("5_002_1_01.png", 5, 0),
        ("5_001_1_04.png", 4, 0),
    ]
    assert all(Path(r.path).parent.name == "images_labeled" for r in ds.train + ds.query)


def test_cuhk03_from_extracted_images_only(cuhk_root: Path) -> None:
    first = CUHK03(cuhk_root)
    mtime = (first.dataset_dir / "images_labeled" / "1_001_1_01.png").stat().st_mtime_ns
    (first.dataset_dir / "cuhk03_release" / "cuhk-03.mat").unlink()  # extracted once, no .mat
    again = CUHK03(cuhk_root)
    assert again.train == first.train and again.gallery == first.gallery
    assert (first.dataset_dir / "images_labeled" / "1_001_1_01.png").stat().st_mtime_ns == mtime
    # an image listed by the protocol but missing from the extracted folder is named
    (first.dataset_dir / "images_labeled" / "5_001_1_04.png").unlink()
    with pytest.raises(DatasetLayoutError, match="missing") as err:
        CUHK03(cuhk_root)
    assert "5_001_1_04.png" in str(err.value)
    with pytest.raises(DatasetLayoutError, match=re.escape("cuhk-03.mat")):
        CUHK03(cuhk_root, labeled=False)  # neither extracted images nor the .mat


def test_cuhk03_classic_protocol(cuhk_root: Path) -> None:
    ds = CUHK03(cuhk_root, split_id=0, protocol="classic")
    test_keys = {1001, 5002}  # (campid, pid) pairs (1, 1) and (5, 2) of testsets[0]
    assert {r.pid for r in ds.query} == test_keys and ds.query == ds.gallery
    assert len(ds.query) == len(CUHK_CELLS[(1, 1)]) + len(CUHK_CELLS[(5, 2)])
    assert ds.num_train_pids == 3 and len(ds.train) == 4 + 4 + 2
    split1 = CUHK03(cuhk_root, split_id=1, protocol="classic")
    assert {r.pid for r in split1.query} == {2001, 1002}
    # the classic splits are scored with single-gallery-shot CMC, the new protocol is not
    assert ds.use_metric_cuhk03
    assert not CUHK03(cuhk_root).use_metric_cuhk03
    with pytest.raises(ValueError, match="split_id"):
        CUHK03(cuhk_root, split_id=20, protocol="classic")


def test_cuhk03_errors(tmp_path: Path, cuhk_root: Path) -> None:
    with pytest.raises(
        DatasetLayoutError, match=re.escape("cuhk03_new_protocol_config_labeled.mat")
    ):
        CUHK03(tmp_path / "nothing_here")
    cfg = cuhk_root / "cuhk03" / "cuhk03_new_protocol_config_labeled.mat"
    savemat(cfg, {"filelist": np.array([["1_001_1_01.png"]], dtype=object)})
    with pytest.raises(DatasetLayoutError, match="lacks") as err:
        CUHK03(cuhk_root)
    assert str(cfg) in str(err.value)
    _write_config(cfg, ["1_001_1_01.png"], [1], [1], [2], [1])
    with pytest.raises(DatasetLayoutError, match=r"query_idx outside 1\.\.1"):
        CUHK03(cuhk_root)
    _write_config(cfg, ["1_1_1_1.png"], [1], [1], [1], [1])
    with pytest.raises(DatasetLayoutError, match="is not"):
        CUHK03(cuhk_root)
    mat = cuhk_root / "cuhk03" / "cuhk03_release" / "cuhk-03.mat"
    mat.write_bytes(b"MATLAB 5.0 MAT-file, not HDF5")
    with pytest.raises(DatasetLayoutError, match="HDF5") as err:
        CUHK03(cuhk_root, labeled=False)
    assert str(mat) in str(err.value)
    assert not (cuhk_root / "cuhk03" / "images_detected").exists()  # no partial extraction


# --------------------------------------------------------------------------- generic


def test_image_list_dataset(tmp_path: Path) -> None:
    for name in ("a b/x1.jpg", "a b/x2.jpg", "y/1.png", "y/2.png", "z.jpg"):
        _img(tmp_path / name)
    (tmp_path / "train.txt").write_text(
        "# path pid camid\na b/x1.jpg 40 0\na b/x2.jpg 40 1\n\ny/1.png 7 2  # comment\nz.jpg -1 0\n"
    )
    (tmp_path / "query.txt").write_text("y/1.png 7 0\n")
    (tmp_path / "gallery.txt").write_text("y/2.png 7 1\nz.jpg 0 1\n")
    ds = ImageListDataset(tmp_path)
    assert [(Path(r.path).relative_to(tmp_path).as_posix(), r.pid, r.camid) for r in ds.train] == [
        ("a b/x1.jpg", 1, 0), ("a b/x2.jpg", 1, 1), ("y/1.png", 0, 2),
    ]  # fmt: skip
    assert [(r.pid, r.camid) for r in ds.query] == [(7, 0)]
    assert [(r.pid, r.camid) for r in ds.gallery] == [(7, 1), (0, 1)]
    only_train = ImageListDataset(tmp_path, query=None, gallery=None)
    assert only_train.query == [] and len(only_train.train) == 3
    (tmp_path / "query.txt").write_text("y/1.png seven 0\n")
    with pytest.raises(DatasetLayoutError, match="line 1") as err:
        ImageListDataset(tmp_path)
    assert "query.txt" in str(err.value)
    with pytest.raises(DatasetLayoutError, match="together"):
        ImageListDataset(tmp_path, gallery=None)


def test_image_folder_dataset(tmp_path: Path) -> None:
    for rel in ("train/bob/1.jpg", "train/bob/2.jpg", "train/alice/1.jpg",
                "query/carol/cam2/q.jpg", "gallery/carol/cam1/g.jpg", "gallery/dave/cam1/g.jpg",
                "gallery/-1/cam1/junk.jpg"):  # fmt: skip
        _img(tmp_path / rel)
    ds = ImageFolderDataset(tmp_path)
    assert sorted((Path(r.path).parent.name, Path(r.path).name, r.pid) for r in ds.train) == [
        ("alice", "1.jpg", 0), ("bob", "1.jpg", 1), ("bob", "2.jpg", 1),
    ]  # fmt: skip
    # test identities share one sorted map (carol 0, dave 1); cameras are indices in the sorted
    # camera names of all splits: "0" (train images without camera folder) < "cam1" < "cam2"
    assert [(r.pid, r.camid) for r in ds.query] == [(0, 2)]
    assert sorted((r.pid, r.camid) for r in ds.gallery) == [(0, 1), (1, 1)]
    _img(tmp_path / "query" / "carol" / "stray.jpg")
    with pytest.raises(DatasetLayoutError, match="mixes images and camera folders") as err:
        ImageFolderDataset(tmp_path)
    assert "stray.jpg" in str(err.value)


# --------------------------------------------------------------------------- torch wrapper


def test_image_dataset_items_and_unreadable_image(tmp_path: Path) -> None:
    good, broken, missing = tmp_path / "good.png", tmp_path / "broken.jpg", tmp_path / "gone.jpg"
    _img(good, colour=(1, 2, 3), size=(6, 4))
    broken.write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    records = [
        ReidRecord(str(good), 5, 2),
        ReidRecord(str(broken), 1, 0),
        ReidRecord(str(missing), 1, 0),
    ]
    ds = ImageDataset(records)
    img, pid, camid, index = ds[0]
    assert img.dtype == torch.uint8 and img.shape == (3, 6, 4)
    assert img[:, 0, 0].tolist() == [1, 2, 3]
    assert (pid, camid, index) == (5, 2, 0)
    with pytest.raises(ImageReadError, match=re.escape("broken.jpg")):
        ds[1]
    with pytest.raises(ImageReadError, match=re.escape("gone.jpg")):
        ds[2]
    halves = ImageDataset(records[:1], transform=lambda im: im.size)
    assert halves[0][0] == (4, 6)


# --------------------------------------------------------------------------- registry / combine


def test_registry(market_root: Path) -> None:
    assert {"market1501", "cuhk03", "msmt17", "personx", "image_list", "image_folder"} <= set(
        datasets.names()
    )
    ds = datasets.create("Market1501", market_root)
    assert isinstance(ds, Market1501) and ds.num_train_pids == 3
    with pytest.raises(KeyError, match=r"known: .*market1501"):
        datasets.create("dukemtmc-reid", market_root)


def test_combine_datasets(market_root: Path, tmp_path: Path) -> None:
    market = Market1501(market_root)
    other = _market(tmp_path / "other", ["0004_c2s1_000001_01.jpg", "0009_c2s1_000002_01.jpg"],
                    MARKET_QUERY, MARKET_GALLERY)  # fmt: skip
    both = combine_datasets([market, Market1501(other)])
    assert both.sources == ["market1501", "market1501"]
    assert len(both.train) == 7 and both.num_train_pids == 5
    tail = [(r.pid, r.camid, r.dsetid) for r in both.train[5:]]
    assert tail == [(3, 5, 1), (4, 5, 1)]  # pids after market's 3, cameras after its 5
    assert both.query == [] and both.gallery == []
