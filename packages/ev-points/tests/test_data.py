"""Dataset readers on files generated in the official layouts; malformed files are rejected
with the path and line; grid subsampling and the cache."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ev_points.data import (
    IGNORE_INDEX,
    S3DIS_CLASSES,
    PointDataError,
    PointScene,
    grid_subsample,
    list_scannet_scenes,
    load_cache,
    make_synthetic_scene,
    nyu40_to_scannet20,
    preprocess,
    read_ply_vertices,
    read_s3dis_room,
    read_scannet_scene,
    s3dis_area_split,
    s3dis_six_fold,
    write_ply_vertices,
)


# ---------------------------------------------------------------- S3DIS
def _write_txt(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"{x:.3f} {y:.3f} {z:.3f} {int(r)} {int(g)} {int(b)}" for x, y, z, r, g, b in arr]
    path.write_text("\n".join(lines) + "\n")


def make_s3dis(
    root: Path, rooms_per_area: int = 1, seed: int = 0
) -> dict[str, dict[str, np.ndarray]]:
    """A tiny S3DIS tree; returns, per room, the points written per annotation file."""
    rng = np.random.default_rng(seed)
    written: dict[str, dict[str, np.ndarray]] = {}
    for area in range(1, 7):
        for r in range(rooms_per_area):
            room = root / f"Area_{area}" / f"office_{r + 1}"
            objs = {}
            for name in ("ceiling_1", "chair_1", "chair_2", "stairs_1", "wall_1"):
                pts = np.concatenate([rng.uniform(0, 5, (7, 3)), rng.integers(0, 256, (7, 3))], 1)
                _write_txt(room / "Annotations" / f"{name}.txt", pts)
                objs[name] = pts
            _write_txt(room / f"office_{r + 1}.txt", np.concatenate(list(objs.values())))
            written[f"Area_{area}/office_{r + 1}"] = objs
    return written


def test_s3dis_room_labels_and_instances(tmp_path: Path) -> None:
    written = make_s3dis(tmp_path)
    scene = read_s3dis_room(tmp_path / "Area_2" / "office_1")
    objs = written["Area_2/office_1"]
    assert scene.name == "Area_2/office_1" and len(scene) == 35
    names = sorted(objs)  # files are read in sorted order
    expect = np.concatenate([np.full(7, S3DIS_CLASSES.index(n.split("_")[0]) if n.split("_")[0] in S3DIS_CLASSES
                                     else S3DIS_CLASSES.index("clutter")) for n in names])  # fmt: skip
    np.testing.assert_array_equal(scene.segment, expect)
    np.testing.assert_array_equal(scene.instance, np.repeat(np.arange(5), 7))
    np.testing.assert_allclose(
        scene.coord, np.concatenate([objs[n][:, :3] for n in names]), atol=1e-3
    )
    np.testing.assert_array_equal(
        scene.color, np.concatenate([objs[n][:, 3:] for n in names]).astype(np.uint8)
    )
    assert (scene.segment[21:28] == S3DIS_CLASSES.index("clutter")).all()  # stairs -> clutter


def test_s3dis_splits(tmp_path: Path) -> None:
    make_s3dis(tmp_path, rooms_per_area=2)
    train, test = s3dis_area_split(tmp_path, 5)
    assert len(train) == 10 and len(test) == 2
    assert all(p.parent.name == "Area_5" for p in test)
    assert all(p.parent.name != "Area_5" for p in train)
    folds = list(s3dis_six_fold(tmp_path))
    assert [f[0] for f in folds] == [1, 2, 3, 4, 5, 6]
    assert sorted(p for f in folds for p in f[2]) == sorted(
        p for f in folds[:1] for p in f[1] + f[2]
    )


def test_s3dis_malformed_line_names_path_and_line(tmp_path: Path) -> None:
    make_s3dis(tmp_path)
    bad = tmp_path / "Area_1" / "office_1" / "Annotations" / "chair_1.txt"
    lines = bad.read_text().splitlines()
    lines[3] = "1.0 2.0 3.0 10 20 2\x100"  # the kind of stray byte the real release has
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(PointDataError, match=r"chair_1\.txt:4: not numbers"):
        read_s3dis_room(tmp_path / "Area_1" / "office_1")
    lines[3] = "1.0 2.0 3.0 10 20"
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(PointDataError, match=r"chair_1\.txt:4: expected 6 values"):
        read_s3dis_room(tmp_path / "Area_1" / "office_1")
    lines[3] = "1.0 2.0 3.0 10 20 300"
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(PointDataError, match=r"chair_1\.txt:4: colour"):
        read_s3dis_room(tmp_path / "Area_1" / "office_1")


def test_s3dis_layout_errors(tmp_path: Path) -> None:
    make_s3dis(tmp_path)
    with pytest.raises(PointDataError, match="nowhere: S3DIS root folder not found"):
        s3dis_area_split(tmp_path / "nowhere")
    (tmp_path / "Area_4").rename(tmp_path / "Area_4_old")
    with pytest.raises(PointDataError, match="missing Area_4"):
        s3dis_area_split(tmp_path)
    room = tmp_path / "Area_3" / "office_1"
    (room / "Annotations" / "weird.txt").write_text("1 2 3 4 5 6\n")
    with pytest.raises(PointDataError, match=r"weird\.txt"):
        read_s3dis_room(room)
    (room / "office_1.txt").unlink()
    with pytest.raises(PointDataError, match=r"office_1\.txt"):
        read_s3dis_room(room)


# ---------------------------------------------------------------- ScanNet
TSV = "id\traw_category\tcategory\tcount\tnyu40id\tnyu40class\n1\tchair\tchair\t1\t5\tchair\n2\twall\twall\t1\t1\twall\n3\tceiling\tceiling\t1\t22\tceiling\n"


def make_scannet(
    root: Path, name: str = "scene0000_00", ascii: bool = False, seed: int = 0
) -> np.ndarray:
    """One scene; returns the expected 20-class label of every vertex."""
    rng = np.random.default_rng(seed)
    d = root / "scans" / name
    d.mkdir(parents=True)
    (root / "scannetv2-labels.combined.tsv").write_text(TSV)
    v = 40
    coord = rng.uniform(-1, 1, (v, 3)).astype(np.float32)
    color = rng.integers(0, 256, (v, 3)).astype(np.uint8)
    write_ply_vertices(
        d / f"{name}_vh_clean_2.ply", coord, color, faces=np.array([[0, 1, 2]]), ascii=ascii
    )
    seg = rng.integers(0, 8, v)
    (d / f"{name}_vh_clean_2.0.010000.segs.json").write_text(
        json.dumps({"sceneId": name, "segIndices": seg.tolist()})
    )
    groups = [
        {"id": 0, "objectId": 0, "segments": [0, 1], "label": "chair"},
        {"id": 1, "objectId": 1, "segments": [2], "label": "wall"},
        {"id": 2, "objectId": 2, "segments": [3], "label": "ceiling"},
        {"id": 3, "objectId": 3, "segments": [4], "label": "unlisted thing"},
    ]
    (d / f"{name}.aggregation.json").write_text(json.dumps({"sceneId": name, "segGroups": groups}))
    expect = np.full(v, IGNORE_INDEX)
    expect[np.isin(seg, [0, 1])] = 4  # chair = NYU40 5 -> class 4
    expect[seg == 2] = 0  # wall
    return expect


@pytest.mark.parametrize("ascii", [False, True])
def test_scannet_scene(tmp_path: Path, ascii: bool) -> None:
    expect = make_scannet(tmp_path, ascii=ascii)
    scenes = list_scannet_scenes(tmp_path)
    scene = read_scannet_scene(scenes[0], tmp_path / "scannetv2-labels.combined.tsv")
    np.testing.assert_array_equal(scene.segment, expect)
    assert len(scene) == 40 and scene.color.dtype == np.uint8


def test_nyu40_mapping() -> None:
    got = nyu40_to_scannet20(np.array([0, 1, 2, 13, 14, 39, 40, 99]))
    np.testing.assert_array_equal(got, [-1, 0, 1, -1, 12, 19, -1, -1])


def test_scannet_malformed(tmp_path: Path) -> None:
    make_scannet(tmp_path)
    d = tmp_path / "scans" / "scene0000_00"
    tsv = tmp_path / "scannetv2-labels.combined.tsv"
    segs = d / "scene0000_00_vh_clean_2.0.010000.segs.json"
    good = segs.read_text()
    segs.write_text('{"segIndices": [1, 2,\n 3')
    with pytest.raises(PointDataError, match=r"segs\.json:2: invalid JSON"):
        read_scannet_scene(d, tsv)
    segs.write_text(json.dumps({"segIndices": [0, 1]}))
    with pytest.raises(PointDataError, match="one id per vertex"):
        read_scannet_scene(d, tsv)
    segs.write_text(good)
    agg = d / "scene0000_00.aggregation.json"
    agg.write_text(json.dumps({"segGroups": [{"segments": [999], "label": "chair"}]}))
    with pytest.raises(PointDataError, match="segment 999"):
        read_scannet_scene(d, tsv)
    ply = d / "scene0000_00_vh_clean_2.ply"
    ply.write_bytes(ply.read_bytes()[:300])
    with pytest.raises(PointDataError, match="truncated"):
        read_scannet_scene(d, tsv)
    tsv.write_text("a\tb\n")
    with pytest.raises(PointDataError, match="raw_category"):
        read_scannet_scene(d, tsv)


# ---------------------------------------------------------------- grid subsampling and cache
def test_grid_subsample_matches_a_loop() -> None:
    scene = make_synthetic_scene(3)
    scene.segment[::7] = IGNORE_INDEX
    out = grid_subsample(scene, 0.2)
    cells: dict[tuple, list[int]] = {}
    origin = scene.coord.min(0)
    for i, c in enumerate(np.floor((scene.coord - origin) / 0.2).astype(np.int64)):
        cells.setdefault(tuple(c), []).append(i)
    assert len(out.scene) == len(cells)
    for k, members in enumerate(cells.values()):  # dict order = first occurrence
        np.testing.assert_allclose(
            out.scene.coord[k], scene.coord[members].mean(0), rtol=1e-5, atol=1e-5
        )
        assert (out.inverse[members] == k).all()
        labels = scene.segment[members]
        labels = labels[labels != IGNORE_INDEX]
        want = np.bincount(labels).argmax() if len(labels) else IGNORE_INDEX
        assert out.scene.segment[k] == want


def test_cache_roundtrip_and_settings_guard(tmp_path: Path) -> None:
    make_s3dis(tmp_path / "raw")
    rooms = sorted((tmp_path / "raw").glob("Area_*/office_1"))
    paths = preprocess(rooms, read_s3dis_room, tmp_path / "cache", grid_size=None, dataset="s3dis")
    assert len(paths) == 6 and paths[0].name == "Area_1__office_1.npz"
    scenes = load_cache(tmp_path / "cache")
    direct = read_s3dis_room(rooms[0])
    assert scenes[0].name == direct.name
    np.testing.assert_array_equal(scenes[0].coord, direct.coord)
    np.testing.assert_array_equal(scenes[0].segment, direct.segment)
    with pytest.raises(PointDataError, match=r"meta\.json"):
        preprocess(rooms, read_s3dis_room, tmp_path / "cache", grid_size=0.1, dataset="s3dis")
    with pytest.raises(PointDataError, match=r"meta\.json"):
        load_cache(tmp_path / "raw")


def test_synthetic_scenes_are_deterministic() -> None:
    a, b = make_synthetic_scene(7), make_synthetic_scene(7)
    np.testing.assert_array_equal(a.coord, b.coord)
    assert isinstance(a, PointScene) and len(np.unique(a.segment)) == 7


def test_ply_reader_rejects_non_ply(tmp_path: Path) -> None:
    p = tmp_path / "x.ply"
    p.write_text("hello\n")
    with pytest.raises(PointDataError, match=r"x\.ply:1"):
        read_ply_vertices(p)
