"""Every parser of user files, fuzzed: it parses or raises ev-reid's own error naming the path.

Hypothesis generates file and folder names, list-file lines (also undecodable bytes),
``.mat`` contents and JSON documents. "Our own error" is an :class:`ev_core.errors.EvError`
whose message names a path inside the dataset / the file read; an ``IndexError``,
``KeyError``, ``UnicodeDecodeError`` (or any other exception) escaping a parser fails.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from scipy.io import savemat

from ev_core.errors import EvError
from ev_reid.datasets import (
    CUHK03,
    MSMT17,
    ImageFolderDataset,
    ImageListDataset,
    Market1501,
    PersonX,
    ReidDataset,
)

FUZZ = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

# file-name characters: digits, separators and letters the schemes use, plus odd ones
_NAME_CHARS = st.sampled_from(list("0123456789_-csCS.jpgnJPG ab+#²٣éΩ"))
NAMES = st.text(_NAME_CHARS, min_size=1, max_size=24).filter(lambda s: s not in (".", ".."))
IMAGE_NAMES = st.one_of(
    NAMES,
    st.builds(lambda a, b: f"{a}.{b}", NAMES, st.sampled_from(["jpg", "png", "JPG", "txt"])),
    st.builds(  # near-valid Market names
        lambda pid, cam, seq, rest: f"{pid}_c{cam}s{seq}_{rest}.jpg",
        st.sampled_from(["0001", "-1", "0000", "12", "-2", "--1", "٣٣", "x"]),
        st.sampled_from(["1", "6", "0", "7", "12", "²", ""]),
        st.sampled_from(["1", "", "x"]),
        st.sampled_from(["000451_03", "1", "", "_"]),
    ),
)
TEXT_LINES = st.one_of(
    st.text(max_size=60),
    st.builds(
        lambda path, pid, cam: f"{path} {pid} {cam}",
        NAMES,
        st.sampled_from(["0", "-1", "7", "--3", "x", "²", "1e3", "-0", "٣"]),
        st.sampled_from(["0", "1", "-1", "x", "99999999999999999999"]),
    ),
    st.builds(  # near-valid MSMT17 lines
        lambda pid, idx, cam, label: f"{pid}/{pid}_{idx}_{cam}_0303morning_0015_0.jpg {label}",
        st.sampled_from(["0000", "0001", "x", ""]),
        st.sampled_from(["000", "1", ""]),
        st.sampled_from(["01", "15", "16", "00", "1", "x1"]),
        st.sampled_from(["0", "-1", "--2", "x", "²", "3 4"]),
    ),
)
LIST_CONTENTS = st.one_of(
    st.lists(TEXT_LINES, max_size=6).map(lambda lines: "\n".join(lines).encode("utf-8")),
    st.binary(max_size=80),
)


@contextmanager
def _tmpdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="ev_reid_fuzz_"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _img(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 8), (10, 20, 30)).save(path, format="PNG")


def _parses_or_names_path(parse: Callable[[], Any], root: Path) -> Any:
    """Run ``parse``: a result, or an EvError whose message names a path under ``root``."""
    try:
        result = parse()
    except EvError as exc:
        error: EvError | None = exc
    else:
        error = None
    if error is not None:
        path = getattr(error, "path", None)
        assert path is not None, f"{type(error).__name__} without a path: {error}"
        assert str(path) in str(error), f"message does not name {path}: {error}"
        assert Path(path).resolve().is_relative_to(root.resolve()), f"{path} not under {root}"
        return None
    if isinstance(result, ReidDataset):
        for r in result.train + result.query + result.gallery:
            assert r.camid >= 0 and r.pid >= 0
        assert sorted({r.pid for r in result.train}) == list(range(result.num_train_pids))
    return result


@FUZZ
@given(
    st.sampled_from([Market1501, PersonX]),
    st.lists(IMAGE_NAMES, max_size=5),
    st.lists(IMAGE_NAMES, max_size=4),
    st.lists(IMAGE_NAMES, max_size=4),
)
def test_market_style_folders(cls: type, train: list, query: list, gallery: list) -> None:
    with _tmpdir() as root:
        for folder, names in (("bounding_box_train", train), ("query", query),
                              ("bounding_box_test", gallery)):  # fmt: skip
            (root / folder).mkdir(parents=True)
            for name in names:
                if (root / folder / name).exists():
                    continue
                if name.endswith("txt"):
                    (root / folder / name).write_text("not an image")
                else:
                    _img(root / folder / name)
        _parses_or_names_path(lambda: cls(root), root)


@FUZZ
@given(
    st.sampled_from(["train", "mask_train_v2"]),
    st.dictionaries(
        st.sampled_from(["list_train.txt", "list_val.txt", "list_query.txt", "list_gallery.txt"]),
        LIST_CONTENTS,
    ),
    st.booleans(),
)
def test_msmt17_list_files(train_dir: str, lists: dict, include_val: bool) -> None:
    with _tmpdir() as root:
        test_dir = "test" if train_dir == "train" else "mask_test_v2"
        (root / train_dir).mkdir()
        (root / test_dir).mkdir()
        for name, content in lists.items():
            (root / name).write_bytes(content)
        _parses_or_names_path(lambda: MSMT17(root, include_val=include_val), root)


@FUZZ
@given(
    st.dictionaries(st.sampled_from(["train.txt", "query.txt", "gallery.txt"]), LIST_CONTENTS),
    st.booleans(),
)
def test_image_list_files(lists: dict, combineall: bool) -> None:
    with _tmpdir() as root:
        for name, content in lists.items():
            (root / name).write_bytes(content)
        _parses_or_names_path(lambda: ImageListDataset(root, combineall=combineall), root)


FOLDER_TREE = st.dictionaries(
    st.sampled_from(["train", "query", "gallery"]),
    st.dictionaries(  # identity -> camera (or "" for images directly) -> image names
        NAMES,
        st.dictionaries(
            st.one_of(st.just(""), NAMES), st.lists(IMAGE_NAMES, max_size=2), max_size=2
        ),
        max_size=3,
    ),
)


@FUZZ
@given(FOLDER_TREE, st.booleans())
def test_image_folder_trees(tree: dict, stray_file: bool) -> None:
    with _tmpdir() as root:
        for split, identities in tree.items():
            (root / split).mkdir()
            for ident, cams in identities.items():
                (root / split / ident).mkdir(exist_ok=True)
                for cam, images in cams.items():
                    folder = root / split / ident / cam if cam else root / split / ident
                    if folder.exists() and not folder.is_dir():
                        continue
                    folder.mkdir(exist_ok=True)
                    for name in images:
                        if not (folder / name).exists():
                            _img(folder / name)
            if stray_file:
                (root / split / "README").write_text("stray")
        _parses_or_names_path(lambda: ImageFolderDataset(root), root)


_MAT_VALUES = st.one_of(
    st.lists(st.integers(-3, 12), max_size=6).map(lambda v: np.asarray(v, np.float64)[:, None]),
    st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), max_size=4).map(
        lambda v: np.asarray(v, np.float64)
    ),
    st.lists(st.sampled_from(["1_001_1_01.png", "x", "", "9_999_3_99.png"]), max_size=4).map(
        lambda v: np.asarray(v, dtype=object).reshape(-1, 1) if v else np.empty((0, 1), object)
    ),
    st.just(np.zeros((2, 2, 2))),
    st.text(max_size=5),
)


@FUZZ
@given(
    st.dictionaries(
        st.sampled_from(["filelist", "labels", "train_idx", "query_idx", "gallery_idx"]),
        _MAT_VALUES,
    ),
    st.booleans(),
    st.one_of(st.none(), st.binary(max_size=64)),
)
def test_cuhk03_new_protocol_config(entries: dict, complete: bool, raw: bytes | None) -> None:
    with _tmpdir() as root:
        images = root / "images_labeled"
        for name in ("1_001_1_01.png", "1_001_2_06.png", "2_003_1_02.png"):
            _img(images / name)
        config = root / "cuhk03_new_protocol_config_labeled.mat"
        if raw is not None:
            config.write_bytes(raw)
        else:
            if complete:  # a valid skeleton the fuzzed entries overwrite
                base = {
                    "filelist": np.asarray(
                        ["1_001_1_01.png", "1_001_2_06.png", "2_003_1_02.png"], dtype=object
                    ).reshape(-1, 1),
                    "labels": np.asarray([[1.0], [1.0], [2.0]]),
                    "train_idx": np.asarray([[1.0], [2.0]]),
                    "query_idx": np.asarray([[3.0]]),
                    "gallery_idx": np.asarray([[3.0]]),
                }
                entries = {**base, **entries}
            savemat(config, entries or {"unrelated": np.zeros(1)})
        _parses_or_names_path(lambda: CUHK03(root), root)


_JSON = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-5, 10**12), st.floats(), st.text(max_size=8)),
    lambda children: st.one_of(
        st.lists(children, max_size=3), st.dictionaries(st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=8,
)
_MODEL_FIELDS = st.fixed_dictionaries(
    {"backbone": st.one_of(st.just("resnet18"), _JSON)},
    optional={
        "num_stripes": _JSON,
        "num_classes": _JSON,
        "pooling": st.one_of(st.sampled_from(["avg", "gem"]), _JSON),
        "neck": _JSON,
        "backbone_kwargs": _JSON,
        "last_stride_1": _JSON,
        "gem_p": _JSON,
        "eval_feature": _JSON,
        "unknown": _JSON,
    },
)
CHECKPOINT_JSON = st.one_of(
    st.binary(max_size=40),
    _JSON.map(lambda v: json.dumps(v).encode()),
    st.builds(
        lambda model, meta: json.dumps({"config": {"model": model}, "metadata": meta}).encode(),
        _MODEL_FIELDS,
        _JSON,
    ),
)


@FUZZ
@given(CHECKPOINT_JSON)
def test_checkpoint_json(content: bytes) -> None:
    from ev_reid.inference import read_checkpoint_json
    from ev_reid.models import ReidModelConfig

    with _tmpdir() as root:
        weights = root / "model.safetensors"
        weights.write_bytes(b"\0" * 8)
        weights.with_suffix(".json").write_bytes(content)
        out = _parses_or_names_path(lambda: read_checkpoint_json(weights), root)
        if out is not None:
            cfg, meta = out
            assert isinstance(cfg, ReidModelConfig) and isinstance(meta, dict)
            assert isinstance(cfg.backbone, str) and isinstance(cfg.backbone_kwargs, dict)


INDEX_JSON = st.one_of(
    st.binary(max_size=40),
    _JSON.map(lambda v: json.dumps(v).encode()),
    st.builds(
        lambda dim, backend, cfg, records: json.dumps(
            {"format_version": 1, "dim": dim, "backend": backend, "config": cfg, "records": records}
        ).encode(),
        st.one_of(st.just(4), _JSON),
        st.one_of(st.sampled_from(["torch", "faiss-flat", "bogus"]), _JSON),
        st.one_of(st.just({"metric": "cosine"}), _JSON),
        st.one_of(
            st.just([{"path": "a.jpg", "pid": 1, "camid": 0}]),
            st.lists(st.dictionaries(st.sampled_from(["path", "pid", "camid", "x"]), _JSON)),
            _JSON,
        ),
    ),
)


@FUZZ
@given(INDEX_JSON)
def test_index_json(content: bytes) -> None:
    import torch

    from ev_core.checkpoint import save_checkpoint
    from ev_reid.retrieval import ReidIndex

    with _tmpdir() as root:
        (root / "index.json").write_bytes(content)
        save_checkpoint(root / "features.safetensors", {"features": torch.ones(1, 4)})
        _parses_or_names_path(lambda: ReidIndex.load(root), root)


@FUZZ
@given(
    st.one_of(
        st.binary(max_size=64).map(lambda b: ("raw", b)),
        st.lists(  # testsets: references to arrays of any shape/type
            st.one_of(
                st.lists(st.integers(-2, 6), max_size=8).map(np.asarray),
                st.just(np.zeros((3, 3))),
                st.just(np.asarray([[1.0, 2.0], [1.0, 1.0]])),
                st.just(np.asarray([b"ab"])),
            ),
            max_size=3,
        ).map(lambda arrays: ("h5", arrays)),
    ),
    st.integers(0, 3),
)
def test_cuhk03_classic_splits(source: tuple, split_id: int) -> None:
    import h5py

    with _tmpdir() as root:
        for name in ("1_001_1_01.png", "1_001_2_06.png", "1_002_1_01.png", "1_002_2_07.png"):
            _img(root / "images_labeled" / name)
        mat = root / "cuhk-03.mat"
        kind, payload = source
        if kind == "raw":
            mat.write_bytes(payload)
        else:
            with h5py.File(mat, "w") as f:
                refs = []
                for i, arr in enumerate(payload):
                    refs.append(f.create_dataset(f"split{i}", data=arr).ref)
                f.create_dataset("testsets", data=np.asarray(refs, dtype=h5py.ref_dtype))
        _parses_or_names_path(lambda: CUHK03(root, protocol="classic", split_id=split_id), root)
