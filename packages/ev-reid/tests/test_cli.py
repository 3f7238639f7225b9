"""The ``ev-reid`` CLI end to end: demo (tiny), then pretrain/train/eval/index/search on its data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from ev_reid.cli import app
from ev_reid.datasets import Market1501

TINY_KW = '{"channels": [8, 16, 16, 32], "stem_width": 8}'
runner = CliRunner()


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    result = runner.invoke(app, ["--quiet", "demo", "--out", str(out), "--quick"])
    assert result.exit_code == 0, result.output
    assert "mAP=" in result.output and "mINP=" in result.output
    return out


def test_demo_writes_metrics_figure_and_index(demo_dir: Path) -> None:
    metrics = json.loads((demo_dir / "metrics.json").read_text())
    for key in ("rank1", "rank5", "rank10", "mAP", "mINP"):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert metrics["rank1"] <= metrics["rank5"] <= metrics["rank10"]
    assert metrics["num_valid_queries"] > 0 and metrics["pretrain"]  # (its record: demo.py)
    with Image.open(demo_dir / "ranked_lists.png") as img:
        assert img.format == "PNG" and img.width > 4 * img.height / 3
    assert (demo_dir / "index" / "index.json").is_file()
    assert (demo_dir / "finetune" / "config.json").is_file()
    assert (demo_dir / "pretrain" / "backbone.safetensors").is_file()


def test_eval_index_and_search_commands(demo_dir: Path, tmp_path: Path) -> None:
    model = demo_dir / "finetune" / "model.safetensors"
    data = demo_dir / "data"
    out_json = tmp_path / "eval.json"
    result = runner.invoke(
        app,
        [
            "eval",
            str(model),
            "--data-root",
            str(data),
            "--num-workers",
            "0",
            "--device",
            "cpu",
            "--out",
            str(out_json),
        ],
    )
    assert result.exit_code == 0, result.output
    evaluated = json.loads(out_json.read_text())
    demo_metrics = json.loads((demo_dir / "metrics.json").read_text())
    assert evaluated["mAP"] == pytest.approx(demo_metrics["mAP"], abs=1e-6)

    index_dir = tmp_path / "index"
    result = runner.invoke(
        app,
        [
            "index",
            str(model),
            "--data-root",
            str(data),
            "--out",
            str(index_dir),
            "--backend",
            "torch",
            "--num-workers",
            "0",
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 0, result.output
    gallery = Market1501(data).gallery
    assert f"indexed {len(gallery)} images" in result.output

    # a gallery image searched against its own index comes back first, at distance ~0
    probe = gallery[3]
    hits_json = tmp_path / "hits.json"
    result = runner.invoke(
        app,
        [
            "search",
            str(index_dir),
            probe.path,
            "-k",
            "5",
            "--device",
            "cpu",
            "--out",
            str(hits_json),
        ],
    )
    assert result.exit_code == 0, result.output
    hits = json.loads(hits_json.read_text())[0]["hits"]
    assert len(hits) == 5 and hits[0]["path"] == probe.path and hits[0]["distance"] < 1e-4
    assert hits[0]["pid"] == probe.pid and hits[0]["camid"] == probe.camid


def test_pretrain_and_train_commands(demo_dir: Path, tmp_path: Path) -> None:
    data = demo_dir / "data"
    common = [
        "--data-root",
        str(data),
        "--backbone",
        "resnet18",
        "--backbone-kwargs",
        TINY_KW,
        "--height",
        "64",
        "--width",
        "32",
        "--num-workers",
        "0",
        "--device",
        "cpu",
    ]
    result = runner.invoke(
        app,
        [
            "pretrain",
            "--out",
            str(tmp_path / "pre"),
            *common,
            "--last-stride-1",
            "--batch-size",
            "8",
            "--max-steps",
            "1",
            "--epochs",
            "1",
            "--queue-size",
            "32",
            "--proj-hidden-dim",
            "16",
            "--proj-dim",
            "8",
            "--no-amp",
            "--loss",
            "macl",
            "--no-global-term",
        ],
    )
    assert result.exit_code == 0, result.output
    backbone = tmp_path / "pre" / "backbone.safetensors"
    assert backbone.is_file()
    cfg = json.loads((tmp_path / "pre" / "config.json").read_text())["config"]["run"]
    assert [t["name"] for t in cfg["loss_terms"]] == ["local"]

    result = runner.invoke(
        app,
        [
            "train",
            "--out",
            str(tmp_path / "ft"),
            *common,
            "--init",
            str(backbone),
            "-P",
            "4",
            "-K",
            "4",
            "--epochs",
            "1",
            "--max-steps-per-epoch",
            "2",
            "--pooling",
            "gem",
            "--num-stripes",
            "2",
            "--warmup-epochs",
            "0",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "mAP=" in result.output and (tmp_path / "ft" / "model.safetensors").is_file()
    dumped = json.loads((tmp_path / "ft" / "config.json").read_text())["config"]["run"]["train"]
    assert dumped["model"]["pooling"] == "gem" and dumped["model"]["num_stripes"] == 2
    assert dumped["init_checkpoint"] == str(backbone)


def test_bad_options_are_reported(tmp_path: Path) -> None:
    result = runner.invoke(app, ["train", "--backbone-kwargs", "[1, 2]", "--out", str(tmp_path)])
    assert result.exit_code != 0 and "JSON object" in result.output
    result = runner.invoke(app, ["train", "-K", "1", "--out", str(tmp_path)])
    assert result.exit_code != 0 and "num_instances" in result.output
    result = runner.invoke(app, ["search", str(tmp_path), str(tmp_path / "missing.jpg")])
    assert result.exit_code != 0 and "no such image" in result.output
