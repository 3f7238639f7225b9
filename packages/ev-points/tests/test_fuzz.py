"""Every parser of user files, fuzzed: it parses or raises PointDataError naming the path."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ev_points.data import (
    PointDataError,
    read_label_map,
    read_ply_vertices,
    read_s3dis_room,
    read_scannet_scene,
)
from ev_points.data.text import read_xyzrgb

FUZZ = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

_line = st.lists(
    st.one_of(
        st.floats(allow_nan=True, allow_infinity=True).map(repr),
        st.integers(-5, 300).map(str),
        st.text("0123456789.-eE ,x\t", max_size=6),
    ),
    max_size=8,
).map(" ".join)


def _parses_or_names(call, needle: str) -> None:
    """``call()`` returns, or raises PointDataError whose message contains ``needle``."""
    try:
        call()
    except PointDataError as exc:
        message = str(exc)
    else:
        return
    assert needle in message, message


def _check(fn, path: Path) -> None:
    _parses_or_names(lambda: fn(path), str(path))


@FUZZ
@given(
    st.one_of(
        st.binary(max_size=300), st.lists(_line, max_size=6).map(lambda ls: "\n".join(ls).encode())
    )
)
def test_fuzz_s3dis_text(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "chair_1.txt"
        path.write_bytes(data)
        _check(read_xyzrgb, path)
        room = Path(d) / "Area_1" / "r"
        (room / "Annotations").mkdir(parents=True)
        (room / "r.txt").write_bytes(data)
        (room / "Annotations" / "chair_1.txt").write_bytes(data)
        _parses_or_names(lambda: read_s3dis_room(room), "chair_1.txt")


_HEADERS = [
    b"ply\nformat binary_little_endian 1.0\nelement vertex 3\nproperty float x\nproperty float y\nproperty float z\nproperty uchar red\nproperty uchar green\nproperty uchar blue\nend_header\n",
    b"ply\nformat ascii 1.0\nelement vertex 2\nproperty float x\nproperty float y\nproperty float z\nproperty uchar red\nproperty uchar green\nproperty uchar blue\nend_header\n",
]


@FUZZ
@given(st.sampled_from(_HEADERS), st.binary(max_size=80), st.integers(0, 200))
def test_fuzz_ply(header: bytes, tail: bytes, cut: int) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "scene_vh_clean_2.ply"
        path.write_bytes(
            (header + tail)[: len(header) + len(tail) - cut] if cut < 40 else header[:cut] + tail
        )
        _check(read_ply_vertices, path)


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 50) | st.text(max_size=5),
    lambda c: (
        st.lists(c, max_size=4)
        | st.dictionaries(
            st.sampled_from(["segIndices", "segGroups", "segments", "label"]), c, max_size=3
        )
    ),
    max_leaves=12,
)


@FUZZ
@given(_json_values, _json_values, st.binary(max_size=40))
def test_fuzz_scannet_json_and_tsv(segs, agg, tsv: bytes) -> None:
    import numpy as np

    from ev_points.data import write_ply_vertices

    with tempfile.TemporaryDirectory() as d:
        scene = Path(d) / "scene0000_00"
        scene.mkdir()
        write_ply_vertices(
            scene / "scene0000_00_vh_clean_2.ply",
            np.zeros((3, 3), np.float32),
            np.zeros((3, 3), np.uint8),
        )
        (scene / "scene0000_00_vh_clean_2.0.010000.segs.json").write_text(json.dumps(segs))
        (scene / "scene0000_00.aggregation.json").write_text(json.dumps(agg))
        tsv_path = Path(d) / "scannetv2-labels.combined.tsv"
        tsv_path.write_bytes(b"raw_category\tnyu40id\nchair\t5\n" + tsv)
        _parses_or_names(lambda: read_scannet_scene(scene, tsv_path), d)
        _check(read_label_map, tsv_path)
