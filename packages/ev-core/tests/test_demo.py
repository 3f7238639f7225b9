"""The ev-core demo (``ev demo --only core``): model table against the papers, figure, CLI."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ev_core import demo
from ev_core.cli import app
from ev_core.demo import run_demo

# Exact parameter counts of the official code (1000-class head) and the papers' "GFLOPs"
# (MACs at 224²), SYSTEMS.md §1.2, §1.3, §7.1.
OFFICIAL = {
    "litv2_s": (27_844_000, 3.7),
    "litv2_m": (48_830_368, 7.5),
    "litv2_b": (86_520_704, 13.2),
    "lit_ti": (19_886_272, 3.6),
    "lit_s": (27_973_720, 4.1),
    "lit_m": (49_372_264, 8.6),
    "lit_b": (87_292_384, 15.0),
}
SPEED_MODELS = {"swin_tiny_patch4_window7_224", "litv2_s", "lit_s"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _check_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    from matplotlib.image import imread  # the plot extra (installed in CI's ev-core session)

    img = imread(path)
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 400
    assert img[..., :3].std() > 0.05  # not a blank canvas


def _check_metrics(metrics: dict) -> None:  # type: ignore[type-arg]
    assert set(metrics["models"]) == set(OFFICIAL)
    for name, (params, gflops) in OFFICIAL.items():
        row = metrics["models"][name]
        assert row["params"] == params, name
        assert abs(row["gmacs"] - gflops) <= 0.05, (name, row["gmacs"], gflops)
        assert row["paper_gflops"] == gflops
    assert metrics["all_params_equal_official"] is True
    assert metrics["max_gmacs_gap_vs_paper"] <= 0.05
    speed = metrics["throughput"]
    assert set(speed) == SPEED_MODELS
    assert metrics["throughput_setup"]["baseline"] == "swin_tiny_patch4_window7_224"
    assert speed["swin_tiny_patch4_window7_224"]["speed_vs_baseline"] == pytest.approx(1.0)
    for row in speed.values():
        assert row["img_per_s"] > 0 and row["runs"] >= 1
        # images/s is batch / median time
        batch = metrics["throughput_setup"]["batch_size"]
        assert row["img_per_s"] == pytest.approx(batch / (row["median_ms"] / 1e3), rel=1e-2)


def test_run_demo_quick(tmp_path: Path) -> None:
    metrics = run_demo(tmp_path, quick=True)
    on_disk = json.loads((tmp_path / "models.json").read_text())
    assert on_disk == json.loads(json.dumps(metrics))  # the returned dict is what was written
    _check_metrics(on_disk)
    assert on_disk["throughput_setup"]["quick"] is True
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["config"]["speed_img_size"] == on_disk["throughput_setup"]["img_size"]
    _check_png(tmp_path / "models.png")


def test_ev_demo_cli_runs_core(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app, ["demo", "--only", "core", "--quick", "--quiet", "--out", str(tmp_path)]
    )
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert list(summary["ran"]) == ["ev-core"] and not summary["failed"]
    core_dir = tmp_path / "core"
    assert summary["ran"]["ev-core"]["out_dir"] == str(core_dir)
    _check_metrics(summary["ran"]["ev-core"]["metrics"])
    assert (
        json.loads((core_dir / "models.json").read_text()) == summary["ran"]["ev-core"]["metrics"]
    )
    _check_png(core_dir / "models.png")
    assert str(tmp_path.resolve()) in result.output


def test_missing_matplotlib_names_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # makes the import fail
    with pytest.raises(ImportError, match=r"ev-core\[plot\]"):
        demo._plot({}, tmp_path / "x.png")
