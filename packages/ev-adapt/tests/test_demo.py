"""The demo writes its metrics and figure and compares every method."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ev_adapt import METHODS
from ev_adapt.demo import run_demo

pytest.importorskip("sklearn", reason="the digits shift needs scikit-learn (ev-adapt[digits])")


def test_quick_demo(tmp_path: Path) -> None:
    metrics = run_demo(tmp_path, quick=True)
    assert set(metrics["results"]["3-shot"]) == set(METHODS)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["results"] == metrics["results"]
    if pytest.importorskip("matplotlib"):
        assert (tmp_path / "target_accuracy.png").stat().st_size > 10_000
