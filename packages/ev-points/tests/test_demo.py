"""The ev demo entry point writes its metrics JSON and figure (quick sizes)."""

from __future__ import annotations

import json
from importlib.metadata import entry_points
from pathlib import Path

import pytest


@pytest.mark.filterwarnings("ignore:classes absent")
def test_quick_demo_writes_metrics_and_figure(tmp_path: Path) -> None:
    (ep,) = [e for e in entry_points(group="ev.demo") if e.name == "points"]
    summary = ep.load()(tmp_path, True)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    for method in ("labelled-only", "pointmatch"):
        assert 0.0 <= saved[method]["miou"] <= 1.0
        assert saved[method]["labelled_points"] == summary[method]["labelled_points"] > 0
    assert saved["miou_gain"] == pytest.approx(
        saved["pointmatch"]["miou"] - saved["labelled-only"]["miou"]
    )
    assert (tmp_path / "topdown.png").stat().st_size > 10_000
    assert (tmp_path / "config.json").is_file()
