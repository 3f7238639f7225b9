"""ev_reid.inference: loading a trained model, checkpoint errors (fuzzed), image checks, search."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from ev_core.checkpoint import save_checkpoint
from ev_reid.data import ReidTransformConfig
from ev_reid.data.transforms import build_test_transform
from ev_reid.datasets import ImageReadError, Market1501, ReidDataset, generate_synthetic_market
from ev_reid.inference import (
    CheckpointError,
    evaluate_checkpoint,
    extract_record_features,
    load_for_inference,
    read_checkpoint_json,
    search_index,
)
from ev_reid.models import ReidModel, ReidModelConfig
from ev_reid.records import ReidRecord
from ev_reid.validation import check_image, validate_images
from ev_testing import assert_close

TINY = {"channels": [8, 16, 16, 32], "stem_width": 8}


def _model_cfg(**kw: object) -> ReidModelConfig:
    return ReidModelConfig(backbone="resnet18", backbone_kwargs=dict(TINY), **kw)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Market1501:
    root = generate_synthetic_market(
        tmp_path_factory.mktemp("syn") / "market",
        num_ids=6,
        images_per_id=4,
        num_cameras=2,
        image_size=(64, 32),
        seed=0,
    )
    return Market1501(root)


@pytest.fixture
def checkpoint(tmp_path: Path) -> tuple[Path, ReidModel]:
    torch.manual_seed(0)
    model = ReidModel(_model_cfg(num_classes=3, num_stripes=2)).eval()
    tf = ReidTransformConfig(height=64, width=32)
    path = save_checkpoint(
        tmp_path / "model.safetensors",
        model.state_dict(),
        config=model.config,
        metadata={"epochs": 3, "dataset": "market1501", "transform": tf, "metrics": {"mAP": 0.5}},
    )
    return path, model


def test_load_for_inference_rebuilds_model_transform_and_metadata(
    checkpoint: tuple[Path, ReidModel],
) -> None:
    path, reference = checkpoint
    model, transform, meta = load_for_inference(path)
    assert not model.training
    assert transform == ReidTransformConfig(height=64, width=32)
    assert meta.model == reference.config and meta.epochs == 3 and meta.dataset == "market1501"
    assert meta.metrics == {"mAP": 0.5} and meta.path == path
    x = torch.randn(2, 3, 64, 32)
    with torch.no_grad():
        assert_close(model(x), reference(x))


def test_extract_record_features_is_the_model_on_the_test_transform(
    synthetic: Market1501, checkpoint: tuple[Path, ReidModel]
) -> None:
    model, transform, _ = load_for_inference(checkpoint[0])
    records = synthetic.query[:3]
    feats = extract_record_features(model, records, transform=transform, flip=True)
    tf = build_test_transform(transform)
    with Image.open(records[1].path) as img:
        x = tf(img.convert("RGB")).unsqueeze(0)
    with torch.no_grad():
        expected = (model(x) + model(torch.flip(x, dims=[3]))) / 2
    assert feats.shape == (3, expected.shape[1])
    assert_close(feats[1:2], expected)


def test_checkpoint_errors_name_the_file_and_the_problem(
    checkpoint: tuple[Path, ReidModel], tmp_path: Path
) -> None:
    path, _ = checkpoint
    meta = path.with_suffix(".json")
    with pytest.raises(CheckpointError, match="no such checkpoint") as err:
        load_for_inference(tmp_path / "missing.safetensors")
    assert "missing.safetensors" in str(err.value)

    # truncated weights: the file and "truncated" are named, not a bare SafetensorError
    cut = tmp_path / "cut" / "model.safetensors"
    cut.parent.mkdir()
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    cut.with_suffix(".json").write_bytes(meta.read_bytes())
    with pytest.raises(CheckpointError, match="truncated") as err:
        load_for_inference(cut)
    assert str(cut) in str(err.value)

    # weights without their JSON
    alone = tmp_path / "alone" / "model.safetensors"
    alone.parent.mkdir()
    alone.write_bytes(path.read_bytes())
    with pytest.raises(CheckpointError, match=r"model\.json .*missing") as err:
        load_for_inference(alone)

    # a JSON without a model config (e.g. a pre-training output)
    meta.write_text(json.dumps({"config": {"upreid": {}}, "metadata": {}}))
    with pytest.raises(CheckpointError, match="no ReidModelConfig") as err:
        load_for_inference(path)
    assert str(meta) in str(err.value)

    # weights of another architecture than the JSON says
    other = _model_cfg(num_classes=5)
    meta.write_text(json.dumps({"config": {"model": other.__dict__}, "metadata": {}}))
    with pytest.raises(CheckpointError, match="do not fit") as err:
        load_for_inference(path)


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=10,
)
_model_like = st.fixed_dictionaries(
    {
        "config": st.dictionaries(
            st.sampled_from(["backbone", "pooling", "neck", "num_classes", "x"]),
            _json_values,
            max_size=5,
        )
    },
    optional={"metadata": st.dictionaries(st.sampled_from(["transform", "epochs"]), _json_values)},
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    content=st.one_of(
        st.binary(max_size=64),
        _json_values.map(lambda v: json.dumps(v).encode()),
        _model_like.map(lambda v: json.dumps(v).encode()),
    )
)
def test_checkpoint_json_parser_fuzzed(tmp_path: Path, content: bytes) -> None:
    weights = tmp_path / "fuzz.safetensors"
    weights.write_bytes(b"\0")
    meta = weights.with_suffix(".json")
    meta.write_bytes(content)
    try:
        cfg, metadata = read_checkpoint_json(weights)
    except CheckpointError as exc:
        message = str(exc)
    else:
        assert isinstance(cfg, ReidModelConfig) and isinstance(metadata, dict)
        return
    assert str(meta) in message


def _truncate(src: str, dest: Path, keep: float = 0.5) -> str:
    data = Path(src).read_bytes()
    dest.write_bytes(data[: int(len(data) * keep)])
    return str(dest)


def test_validate_images_reports_every_bad_file_at_once(
    synthetic: Market1501, tmp_path: Path
) -> None:
    good = synthetic.query[0].path
    assert check_image(good) is None
    png = tmp_path / "ok.png"
    Image.new("RGB", (8, 16), (1, 2, 3)).save(png)
    assert check_image(png) is None
    Image.new("RGB", (8, 16)).save(tmp_path / "full.png")
    bad = {
        _truncate(good, tmp_path / "cut.jpg"): "truncated JPEG",
        _truncate(str(tmp_path / "full.png"), tmp_path / "cut.png", 0.8): "truncated PNG",
        str(tmp_path / "missing.jpg"): "missing",
    }
    (tmp_path / "text.jpg").write_text("not an image")
    bad[str(tmp_path / "text.jpg")] = "not an image"
    (tmp_path / "empty.jpg").write_bytes(b"")
    bad[str(tmp_path / "empty.jpg")] = "empty"
    records = [
        ReidRecord(good, 1, 1),
        *(ReidRecord(p, 1, 1) for p in bad),
        ReidRecord(str(png), 1, 1),
    ]
    with pytest.raises(ImageReadError) as err:
        validate_images(records)
    first_line = str(err.value).splitlines()[0]
    assert first_line.startswith(f"{len(bad)} of 7 images cannot be read")
    for path, why in bad.items():
        assert path in first_line and why in str(err.value)
    assert validate_images([good, png]) == 2


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.binary(max_size=256), suffix=st.sampled_from([".jpg", ".png", ".bmp"]))
def test_check_image_never_raises_on_arbitrary_bytes(
    tmp_path: Path, data: bytes, suffix: str
) -> None:
    path = tmp_path / f"fuzz{suffix}"
    path.write_bytes(data)
    result = check_image(path)
    assert result is None or isinstance(result, str)


def test_evaluate_checkpoint_checks_images_before_extracting(
    synthetic: Market1501, checkpoint: tuple[Path, ReidModel], tmp_path: Path
) -> None:
    gallery = list(synthetic.gallery)
    gallery[2] = ReidRecord(_truncate(gallery[2].path, tmp_path / "g.jpg"), gallery[2].pid, 1)
    ds = ReidDataset(synthetic.train, synthetic.query, gallery, dataset_dir=synthetic.dataset_dir)
    with pytest.raises(ImageReadError, match=r"1 of 18 images cannot be read: .*g\.jpg: truncated"):
        evaluate_checkpoint(checkpoint[0], ds, device="cpu")
    result = evaluate_checkpoint(checkpoint[0], synthetic, device="cpu")
    assert 0.0 <= result.mAP <= 1.0


def test_search_index_without_model_json_names_the_folder(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="pass the model checkpoint"):
        search_index(tmp_path, [], checkpoint=None)
